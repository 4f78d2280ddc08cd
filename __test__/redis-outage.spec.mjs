// A Redis outage must never cost a user their bank connection. With
// rotating refresh tokens, a refresh that runs without the fleet-wide lock
// may spend a refresh token another instance is spending, and the provider
// then revokes the whole grant. So, by default (onError 'auto'): while
// Redis cannot coordinate (down, stalled, or a new server that may have
// lost the locks), no refresh that would send a refresh token runs; a
// caller whose token still works keeps it, one whose token expired gets
// COORDINATOR_UNAVAILABLE; client-credentials refreshes carry on
// in-process. Coordination resumes by itself, within a second.
import { fork } from 'node:child_process'
import http from 'node:http'
import { fileURLToPath } from 'node:url'
import Provider from 'oidc-provider'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'

import { TokenManager, oauth2Refresher, tarabutRefresher } from '../index.mjs'
import { USER_ID_KEY, cli, newKey, sleep, startRedis } from './helpers/redis.mjs'
import { startTarabutServer } from './helpers/tarabut-server.mjs'

const FLEET_WORKER = fileURLToPath(new URL('./helpers/fleet-worker.mjs', import.meta.url))
const MIN = 60_000
let seq = 0
const uid = (name = 'user') => `${name}-${++seq}`
/** A refresh function counting its runs; tokens unique per run. */
const refresher = () =>
  vi.fn(async (ctx) => ({ accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 }))
/** A token endpoint that only counts what reaches it. */
async function countingServer() {
  const server = http.createServer((req, res) => {
    server.hits++
    res.writeHead(500).end()
  })
  server.hits = 0
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return { server, url: `http://127.0.0.1:${server.address().port}/token` }
}

function warnings(code) {
  const seen = []
  const on = (w) => w.code === code && seen.push(w.message)
  process.on('warning', on)
  return { seen, off: () => process.off('warning', on) }
}

describe("onError 'auto' (the default) while Redis is down", () => {
  it('never spends a refresh token in-process: a valid token is served, an expired one refused; client credentials still refresh', async () => {
    const redis = await startRedis()
    const key = newKey()
    const endpoint = await countingServer()
    const tarabut = await startTarabutServer()
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    const m = new TokenManager({ bufferTimeMs: MIN, refreshTimeoutMs: 5_000, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
    try {
      await m.getValidToken(uid(), { accessToken: 'a', expiresAt: 0 }, refresher()) // connected
      await redis.stop()

      const spend = refresher()
      const due = { accessToken: 'due', refreshToken: 'r-due', expiresAt: Date.now() + 30_000 }
      await expect(m.getValidToken(uid(), due, spend)).resolves.toEqual({ accessToken: 'due', shouldUpdate: false, expiresAt: new Date(due.expiresAt) })
      const expired = { accessToken: 'old', refreshToken: 'r-old', expiresAt: Date.now() - 1_000 }
      const refused = await m.getValidToken(uid(), expired, spend).catch((e) => e)
      expect(refused).toMatchObject({ name: 'TokenRefreshError', code: 'COORDINATOR_UNAVAILABLE' })
      expect(refused.message).not.toContain('r-old')
      expect(spend).not.toHaveBeenCalled()
      // The native OAuth2 refresher: refused before any request.
      const oauth2 = oauth2Refresher({ tokenUrl: endpoint.url, clientId: 'c', clientSecret: 's' })
      await expect(m.getValidToken(uid(), expired, oauth2)).rejects.toMatchObject({ code: 'COORDINATOR_UNAVAILABLE' })
      expect(endpoint.server.hits).toBe(0)
      expect(m.stats()).toMatchObject({ staleServed: 1, redisFallbacks: 0, refreshes: 1 })

      // Nothing to spend: refreshed in-process, as before.
      const noRefreshToken = refresher()
      await expect(m.getValidToken(uid(), { accessToken: 'cc', expiresAt: 0 }, noRefreshToken)).resolves.toMatchObject({ shouldUpdate: true })
      expect(noRefreshToken).toHaveBeenCalledTimes(1)
      // tarabutRefresher is client credentials: a refresh token in the row is never sent.
      const tr = tarabutRefresher({ clientId: tarabut.clientId, clientSecret: tarabut.clientSecret, tokenUrl: tarabut.tokenUrl })
      await expect(m.getValidToken(uid(), { accessToken: 'x', refreshToken: 'unused', expiresAt: 0 }, tr)).resolves.toMatchObject({ shouldUpdate: true })
      expect(tarabut.issued).toBe(1)
      expect(m.stats().redisFallbacks).toBe(2)

      expect(w.seen).toHaveLength(1)
      expect(w.seen[0]).toMatch(/spend a refresh token/)
      expect(w.seen[0]).not.toContain(redis.url)
    } finally {
      w.off()
      await m.close()
      endpoint.server.close()
      await tarabut.close()
    }
  })
})

describe('a fresh stack', () => {
  it('a short refreshTimeoutMs waits out a just-started Redis (up to 1.5 s) instead of refusing', async () => {
    const redis = await startRedis()
    const started = Date.now()
    const m = new TokenManager({ refreshTimeoutMs: 2_000, redis: { url: redis.url, encryptionKey: newKey(), userIdKey: USER_ID_KEY } })
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    try {
      const spend = refresher()
      const expired = { accessToken: 'old', refreshToken: 'r-old', expiresAt: Date.now() - 1_000 }
      await expect(m.getValidToken(uid(), expired, spend)).resolves.toMatchObject({ shouldUpdate: true })
      expect(spend).toHaveBeenCalledTimes(1)
      expect(Date.now() - started).toBeLessThan(2_000)
      expect(w.seen).toEqual([])
    } finally {
      w.off()
      await m.close()
      await redis.stop()
    }
  })
})

describe('recovery', () => {
  it("a refresh that spends no refresh token coordinates again within a second of Redis answering, with 'auto' and 'fail'", async () => {
    let redis = await startRedis()
    const key = newKey()
    const options = (onError) => ({ bufferTimeMs: MIN, refreshTimeoutMs: 5_000, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY, onError } })
    const managers = [new TokenManager(options(undefined)), new TokenManager(options('fail'))]
    const cc = () => ({ accessToken: 'cc', expiresAt: 0 })
    try {
      for (const m of managers) await m.getValidToken(uid(), cc(), refresher())
      await redis.stop()
      await expect(managers[1].getValidToken(uid(), cc(), refresher())).rejects.toMatchObject({ code: 'COORDINATOR_UNAVAILABLE' })
      await sleep(2_000) // long enough for a backing-off probe to pause for long
      redis = await startRedis(redis.port)
      const back = Date.now()
      const resumedAfter = []
      for (const m of managers) {
        for (;;) {
          const fallbacks = m.stats().redisFallbacks
          const ok = await m.getValidToken(uid(), cc(), refresher()).then(
            () => true,
            () => false,
          )
          // Coordinated, not refreshed in-process.
          if (ok && m.stats().redisFallbacks === fallbacks) break
          expect(Date.now() - back).toBeLessThan(5_000)
          await sleep(25)
        }
        resumedAfter.push(Date.now() - back)
        expect(Date.now() - back).toBeLessThan(1_000)
      }
      console.log(`client-credentials refreshes coordinated again ${resumedAfter.join(', ')} ms after Redis was back ('auto', 'fail')`)
    } finally {
      await Promise.all(managers.map((m) => m.close()))
      await redis.stop()
    }
  })
})

// The fleet: 3 processes, one redis-server, one token table (newest expiry
// wins, as the Next.js example's upsert), oidc-provider rotating refresh
// tokens and revoking the grant on reuse. Rounds of concurrent callers,
// ROUND_MS apart; faults as a round starts.
const USERS = 20
const CALLERS = 10
const WORKERS = 3
const ROUND_MS = 3_000
const ACCESS_TTL_S = 4
// A token is due 2 s after it was issued (half its lifetime: the buffer of
// a token whose lifetime the manager knows), so every round refreshes it,
// and still valid as the next round starts (so a caller in a fault round
// keeps it).
const BUFFER_MS = 5_000
const REFRESH_TIMEOUT_MS = 2_500
const LOCK_TTL_MS = 3_000
const TOKEN_DELAY_MS = 800

describe('a fleet on oidc-provider with rotating refresh tokens', () => {
  let server
  let provider
  let tokenUrl
  const refreshLog = []
  const grantErrors = []
  const tokenDelay = { ms: 0 }

  beforeAll(async () => {
    server = http.createServer()
    await new Promise((r) => server.listen(0, '127.0.0.1', r))
    const issuer = `http://127.0.0.1:${server.address().port}`
    provider = new Provider(issuer, {
      clients: [{ client_id: 'fleet-app', client_secret: 'fleet-secret', grant_types: ['authorization_code', 'refresh_token'], redirect_uris: ['https://app.example/cb'] }],
      rotateRefreshToken: true,
      ttl: { AccessToken: ACCESS_TTL_S, RefreshToken: 600, Grant: 600 },
      findAccount: (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
      features: { devInteractions: { enabled: false } },
    })
    provider.on('grant.success', (ctx) => {
      if (ctx.oidc.params.grant_type === 'refresh_token') {
        refreshLog.push({ user: ctx.oidc.entities.Account?.accountId, accessToken: ctx.body?.access_token, at: Date.now() })
      }
    })
    provider.on('grant.error', (ctx, err) => grantErrors.push(err.error))
    const callback = provider.callback()
    // The token endpoint answers late on demand: refreshes are then in
    // flight when Redis dies.
    server.on('request', (req, res) => (tokenDelay.ms > 0 ? setTimeout(() => callback(req, res), tokenDelay.ms) : callback(req, res)))
    tokenUrl = `${issuer}/token`
  })

  afterAll(async () => {
    server?.closeAllConnections()
    await new Promise((r) => server?.close(r))
  })

  async function connect(accountId) {
    const client = await provider.Client.find('fleet-app')
    const grant = new provider.Grant({ accountId, clientId: 'fleet-app' })
    grant.addOIDCScope('offline_access')
    const grantId = await grant.save()
    const refreshToken = await new provider.RefreshToken({ accountId, grantId, client, scope: 'offline_access', gty: 'authorization_code' }).save()
    return { grantId, refreshToken }
  }

  function startFleetWorker(config) {
    const child = fork(FLEET_WORKER, [JSON.stringify(config)], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    const waiting = new Map()
    let readyResolve
    const ready = new Promise((r) => (readyResolve = r))
    child.on('message', (m) => {
      if (m.ready) readyResolve()
      if (m.round !== undefined) waiting.get(m.round)?.(m)
    })
    const exited = new Promise((r) => child.once('exit', r))
    return {
      ready,
      exited,
      round: (round, rows) =>
        new Promise((resolve) => {
          waiting.set(round, resolve)
          child.send({ round, rows })
        }),
      close: () => child.send({ close: true }),
      kill: () => child.kill('SIGKILL'),
    }
  }

  it(`${WORKERS} processes x ${USERS} users x ${CALLERS} callers: Redis paused, killed, killed mid-refresh; no grant lost, one refresh per user per round outside faults`, { timeout: 110_000 }, async () => {
    let redis = await startRedis()
    const key = newKey()
    const config = {
      redisUrl: redis.url,
      key,
      tokenUrl,
      clientId: 'fleet-app',
      clientSecret: 'fleet-secret',
      callers: CALLERS,
      bufferTimeMs: BUFFER_MS,
      doubleCheckWindowMs: 500,
      refreshTimeoutMs: REFRESH_TIMEOUT_MS,
      lockTtlMs: LOCK_TTL_MS,
    }
    const workers = Array.from({ length: WORKERS }, () => startFleetWorker(config))
    // This process is an instance too: it measures how long a caller with
    // an expired token is refused after a restart.
    const probe = new TokenManager({
      bufferTimeMs: BUFFER_MS,
      doubleCheckWindowMs: 500,
      refreshTimeoutMs: REFRESH_TIMEOUT_MS,
      redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY, lockTtlMs: LOCK_TTL_MS },
    })
    const refresh = oauth2Refresher({ tokenUrl, clientId: 'fleet-app', clientSecret: 'fleet-secret' })
    try {
      const users = Array.from({ length: USERS }, (_, i) => `fleet-user-${i}`)
      /** The app's token table: user -> { accessToken, refreshToken, expiresAt } (epoch ms). */
      const table = new Map()
      for (const u of [...users, 'probe']) {
        const { refreshToken } = await connect(u)
        table.set(u, { accessToken: `never-issued-${u}`, refreshToken, expiresAt: Date.now() - 1_000 })
      }
      const save = (u, t) => {
        const row = table.get(u)
        // Newest expiry wins, as the example's guarded upsert.
        if (t.expiresAt >= row.expiresAt) table.set(u, { accessToken: t.accessToken, refreshToken: t.refreshToken ?? row.refreshToken, expiresAt: t.expiresAt })
      }
      await Promise.all(workers.map((w) => w.ready))

      const rounds = []
      const runRound = async (fault) => {
        const index = rounds.length
        const rows = Object.fromEntries(users.map((u) => [u, table.get(u)]))
        const startedAt = Date.now()
        const replies = await Promise.all(workers.map((w) => w.round(index, rows)))
        const results = replies.flatMap((r) => r.results)
        for (const r of results) if (r.shouldUpdate) save(r.user, r)
        const round = { index, fault, startedAt, rows, results, endedAt: Date.now() }
        rounds.push(round)
        return round
      }
      const pace = async () => {
        const last = rounds.at(-1)
        if (last) await sleep(Math.max(0, last.startedAt + ROUND_MS - Date.now()))
      }
      /** Polls with an expired token until a refresh goes through; returns when (epoch ms). */
      const probeUntilServed = async () => {
        for (;;) {
          const row = table.get('probe')
          const got = await probe.getValidToken('probe', { ...row, expiresAt: Date.now() - 1_000 }, refresh).then(
            (t) => t,
            (e) => ({ error: e.code }),
          )
          if (got.error === undefined) {
            if (got.shouldUpdate) save('probe', { ...got, expiresAt: got.expiresAt.getTime() })
            return Date.now()
          }
          expect(got.error).toBe('COORDINATOR_UNAVAILABLE')
          await sleep(100)
        }
      }
      const restarts = []
      const probing = []
      /** Restarts Redis, empty, on its port `downMs` from now; the probe measures, meanwhile. */
      const restartIn = async (downMs) => {
        await sleep(downMs)
        redis = await startRedis(redis.port)
        const restart = { at: Date.now() }
        restarts.push(restart)
        probing.push(probeUntilServed().then((at) => (restart.servedAt = at)))
      }

      // Warm up (a fresh stack settles once), then the schedule.
      await probeUntilServed()
      await runRound('none')
      for (let i = 0; i < 2; i++) {
        await pace()
        await runRound('none')
      }
      // 1. Redis stalls for 2 s as a round starts.
      await pace()
      await cli(redis.port, 'client', 'pause', '2000', 'all')
      await runRound('pause')
      // Redis is fine again: the next round is a steady one.
      await pace()
      await runRound('none')
      // 2. Redis killed as a round starts, back empty 1.5 s later.
      await pace()
      await redis.stop()
      let outage = restartIn(1_500)
      await runRound('kill')
      await outage
      for (const fault of ['after', 'after', 'none']) {
        await pace()
        await runRound(fault)
      }
      // 3. The same with refreshes in flight: the token endpoint answers
      //    after 800 ms, and Redis dies 300 ms into the round.
      await pace()
      tokenDelay.ms = TOKEN_DELAY_MS
      outage = sleep(300)
        .then(() => redis.stop())
        .then(() => restartIn(1_500))
      await runRound('kill-in-flight')
      tokenDelay.ms = 0
      await outage
      for (const fault of ['after', 'after', 'none']) {
        await pace()
        await runRound(fault)
      }

      await Promise.all(probing)
      // Each server-side refresh belongs to the round whose callers first got its token.
      const roundOf = new Map()
      for (const r of rounds) for (const res of r.results) if (res.accessToken && !roundOf.has(res.accessToken)) roundOf.set(res.accessToken, r.index)
      const refreshes = refreshLog.filter((l) => l.user !== 'probe')
      const orphans = refreshes.filter((l) => !roundOf.has(l.accessToken))
      const perRound = rounds.map(() => new Map())
      for (const l of refreshes.filter((x) => roundOf.has(x.accessToken))) {
        const m = perRound[roundOf.get(l.accessToken)]
        m.set(l.user, (m.get(l.user) ?? 0) + 1)
      }
      const summary = rounds.map((r) => {
        const due = users.filter((u) => r.rows[u].expiresAt - r.startedAt < BUFFER_MS)
        const errors = r.results.filter((x) => x.error)
        const refreshed = perRound[r.index]
        const exact = errors.length === 0 && refreshed.size === due.length && due.every((u) => refreshed.get(u) === 1)
        const kinds = [...new Set(errors.map((e) => e.error))].join('/')
        console.log(
          `round ${r.index} (${r.fault}) +${r.startedAt - rounds[0].startedAt} ms: ${due.length} due, ${refreshed.size} refreshed, ${errors.length} refused ${kinds}, ${r.endedAt - r.startedAt} ms`,
        )
        return { r, due, errors, refreshed, exact }
      })
      const refusedFor = restarts.map((s) => s.servedAt - s.at)
      const resumed = restarts.map((s) => summary.find(({ r, due, exact }) => r.startedAt >= s.at && exact && due.length > 0))
      const resumedAfter = restarts.map((s, i) => (resumed[i] === undefined ? null : resumed[i].r.startedAt - s.at))
      // When the first refresh-token refresh of a fleet user ran after the restart.
      const firstRefresh = restarts.map((s) => Math.min(...refreshes.filter((l) => l.at > s.at).map((l) => l.at)) - s.at)
      console.log(
        `after a restart: expired tokens refused for ${refusedFor.join(', ')} ms; first fleet refresh ${firstRefresh.join(', ')} ms after it; one refresh per user per round again from the round starting ${resumedAfter.join(', ')} ms after it`,
      )

      // No grant was ever hurt, and no refresh was lost on the way.
      expect(grantErrors).toEqual([])
      expect(orphans).toEqual([])
      for (const { r, due, errors, refreshed, exact } of summary) {
        // Never two refreshes of one user in one round, whatever happened.
        for (const [u, n] of refreshed) expect(n, `round ${r.index} (${r.fault}) ${u}`).toBe(1)
        // Refused callers: only with COORDINATOR_UNAVAILABLE, and only if
        // their own token was near its end (a valid one is served).
        for (const e of errors) {
          expect(e.error, `round ${r.index} (${r.fault})`).toBe('COORDINATOR_UNAVAILABLE')
          expect(r.rows[e.user].expiresAt - r.startedAt).toBeLessThan(REFRESH_TIMEOUT_MS)
        }
        // Outside faults: exactly one refresh per due user per round.
        if (r.fault === 'none') expect(exact, `round ${r.index}: ${refreshed.size} of ${due.length} due users refreshed, ${errors.length} errors`).toBe(true)
        // A steady round: every caller of a user got the one token refreshed
        // (in a fault round, some may rightly have kept their own).
        if (r.fault === 'none') {
          for (const u of due) {
            const mine = r.results.filter((x) => x.user === u)
            const tokens = [...new Set(mine.map((x) => x.accessToken))]
            expect(tokens, `round ${r.index} (${r.fault}) ${u}: ${tokens.map((t) => `${t.slice(0, 8)}:${mine.filter((x) => x.accessToken === t).length}`)}`).toHaveLength(1)
            expect(mine.some((x) => x.shouldUpdate)).toBe(true)
          }
        }
      }
      // After each restart, expired tokens are refused for about the
      // restart guard's grace (refreshTimeoutMs + 1.5 s), then served.
      for (const ms of refusedFor) {
        expect(ms).toBeGreaterThan(REFRESH_TIMEOUT_MS)
        expect(ms).toBeLessThan(REFRESH_TIMEOUT_MS + 1_500 + 2_000)
      }
      expect(resumedAfter.every((ms) => ms !== null)).toBe(true)

      // Every refresh token in the table still works at the server.
      for (const u of [...users, 'probe']) {
        const t = await refresh({ userId: u, refreshToken: table.get(u).refreshToken })
        expect(t.accessToken, u).toEqual(expect.any(String))
      }
      expect(grantErrors).toEqual([])
    } finally {
      workers.forEach((w) => w.close())
      await Promise.race([Promise.all(workers.map((w) => w.exited)), sleep(5_000)])
      workers.forEach((w) => w.kill())
      await probe.close()
      await redis.stop()
    }
  })
})
