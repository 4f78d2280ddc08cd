// Observability (docs/observability.md): what every refresh did, through
// node:diagnostics_channel, OpenTelemetry (the SDK's in-memory exporters)
// and Prometheus text (parsed by a real parser), and the logger every
// warning goes through. No message, metric or span may hold a token, a
// secret or a Redis URL: every test searches what was published for the
// ones it used.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { AsyncLocalStorage } from 'node:async_hooks'
import { execFile, spawnSync } from 'node:child_process'
import dc from 'node:diagnostics_channel'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { Writable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { inspect, promisify } from 'node:util'

import { context, metrics, trace } from '@opentelemetry/api'
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks'
import { AggregationTemporality, InMemoryMetricExporter, MeterProvider, PeriodicExportingMetricReader } from '@opentelemetry/sdk-metrics'
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import parsePrometheusTextFormat from 'parse-prometheus-text-format'
import pino from 'pino'

import { TokenManager, oauth2Refresher, tarabutRefresher } from '../index.mjs'
import { USER_ID_KEY, freePort, newKey, sleep, startRedis } from './helpers/redis.mjs'
import { startTarabutServer } from './helpers/tarabut-server.mjs'

const pkg = fileURLToPath(new URL('..', import.meta.url))
const MIN = 60_000
const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
let seq = 0
const uid = (name = 'user') => `${name}-${++seq}`

/** Every secret a test used: none may appear in anything published. */
const secrets = new Set()
const secret = (s) => {
  secrets.add(s)
  return s
}
const expired = (u) => ({ accessToken: secret(`old-at-${u}-${Math.random()}`), refreshToken: secret(`old-rt-${u}-${Math.random()}`), expiresAt: Date.now() - 1_000 })
const inBuffer = (u) => ({ accessToken: secret(`due-at-${u}-${Math.random()}`), refreshToken: secret(`due-rt-${u}-${Math.random()}`), expiresAt: Date.now() + MIN })
const valid = (u) => ({ accessToken: secret(`valid-at-${u}-${Math.random()}`), refreshToken: secret(`valid-rt-${u}-${Math.random()}`), expiresAt: Date.now() + 60 * MIN })

/** A refresh function whose tokens are recorded as secrets. */
function refresher({ delayMs = 0, fail } = {}) {
  return vi.fn(async (ctx) => {
    if (delayMs) await sleep(delayMs)
    if (fail) throw fail
    return { accessToken: secret(`new-at-${ctx.userId}-${Math.random()}`), refreshToken: secret(`new-rt-${ctx.userId}-${Math.random()}`), expiresIn: 3600 }
  })
}

/** Asserts that no secret appears anywhere in `what` (deeply inspected, errors and causes included). */
function expectNoSecret(what) {
  const text = inspect(what, { depth: Infinity, showHidden: true, getters: true, maxArrayLength: Infinity, maxStringLength: Infinity })
  const text2 = JSON.stringify(what, (k, v) => (v instanceof Error ? { message: v.message, code: v.code, cause: v.cause } : v))
  for (const s of secrets) {
    expect(text.includes(s), `a secret appears in ${text.slice(0, 200)}`).toBe(false)
    expect(text2?.includes(s) ?? false).toBe(false)
  }
}

/** Records every event of the four channels, as copies (the context object is mutated later). */
function subscribeAll() {
  const refresh = []
  const plain = []
  const handlers = {}
  for (const kind of ['start', 'end', 'asyncStart', 'asyncEnd', 'error']) handlers[kind] = (ctx) => refresh.push({ kind, ctx: { ...ctx } })
  const tc = dc.tracingChannel('tarabut-token-manager:refresh')
  tc.subscribe(handlers)
  const onPlain = (message, name) => plain.push({ name, message })
  const names = ['tarabut-token-manager:stale-served', 'tarabut-token-manager:redis-fallback', 'tarabut-token-manager:invalidate']
  for (const n of names) dc.subscribe(n, onPlain)
  return {
    refresh,
    plain,
    /** The refresh events of `userId`, by kind. */
    of: (userId) => refresh.filter((e) => e.ctx.userId === userId),
    off() {
      tc.unsubscribe(handlers)
      for (const n of names) dc.unsubscribe(n, onPlain)
    },
  }
}

let events
afterEach(() => {
  if (events) {
    expectNoSecret(events.refresh)
    expectNoSecret(events.plain)
    events.off()
    events = undefined
  }
})

describe('diagnostics_channel: tarabut-token-manager:refresh', () => {
  it('traces a refresh: start and end around the call, asyncStart/asyncEnd with waiters and duration when it is over', async () => {
    events = subscribeAll()
    const m = new TokenManager()
    const user = uid()
    const token = expired(user)
    const refreshFn = refresher({ delayMs: 30 })
    await Promise.all([0, 1, 2, 3].map(() => m.getValidToken(user, token, refreshFn)))
    await sleep(0)
    expect(refreshFn).toHaveBeenCalledTimes(1)
    const seen = events.of(user)
    expect(seen.map((e) => e.kind)).toEqual(['start', 'end', 'asyncStart', 'asyncEnd'])
    expect(seen[0].ctx).toEqual({ userId: user, reason: 'expired', refresher: 'custom', coordination: 'local' })
    const done = seen[2].ctx
    expect(done).toMatchObject({ userId: user, reason: 'expired', refresher: 'custom', coordination: 'local', waiters: 4 })
    expect(done.durationMs).toBeGreaterThanOrEqual(25)
    expect(done.durationMs).toBeLessThan(5_000)
    expect(done.code).toBeUndefined()
  })

  it('stores bound to start (how APM agents carry context) are active while the refresh function runs', async () => {
    const als = new AsyncLocalStorage()
    const start = dc.tracingChannel('tarabut-token-manager:refresh').start
    start.bindStore(als, (ctx) => `refreshing ${ctx.userId}`)
    try {
      const m = new TokenManager()
      const user = uid()
      let seen
      await m.getValidToken(user, expired(user), async () => {
        await sleep(1)
        seen = als.getStore()
        return { accessToken: secret(`at-${Math.random()}`), expiresIn: 3600 }
      })
      expect(seen).toBe(`refreshing ${user}`)
    } finally {
      start.unbindStore(als)
    }
  })

  it('says why: expired, buffer, invalidated, no-token', async () => {
    events = subscribeAll()
    const m = new TokenManager()
    const reasons = {}
    for (const [reason, token] of [
      ['expired', expired('e')],
      ['buffer', inBuffer('b')],
      ['no-token', { accessToken: '', expiresAt: 0 }],
    ]) {
      const user = uid(reason)
      await m.getValidToken(user, token, refresher())
      reasons[reason] = events.of(user)[0].ctx.reason
    }
    const user = uid('invalidated')
    const token = valid(user)
    m.invalidate(user, token.accessToken)
    await m.getValidToken(user, token, refresher())
    reasons.invalidated = events.of(user)[0].ctx.reason
    expect(reasons).toEqual({ expired: 'expired', buffer: 'buffer', 'no-token': 'no-token', invalidated: 'invalidated' })
  })

  it('a failed refresh publishes error, with its code in the context; the error is the one callers get', async () => {
    events = subscribeAll()
    const m = new TokenManager()
    const user = uid()
    const err = await m.getValidToken(user, expired(user), refresher({ fail: new Error('provider down') })).catch((e) => e)
    await sleep(0)
    const seen = events.of(user)
    expect(seen.map((e) => e.kind)).toEqual(['start', 'end', 'error', 'asyncStart', 'asyncEnd'])
    expect(seen[2].ctx).toMatchObject({ userId: user, code: 'REFRESH_FAILED', waiters: 1 })
    expect(seen[2].ctx.error).toBe(err)

    const late = uid()
    const slow = new TokenManager({ refreshTimeoutMs: 50 })
    const hung = vi.fn(() => new Promise(() => {}))
    await expect(slow.getValidToken(late, expired(late), hung)).rejects.toMatchObject({ code: 'REFRESH_TIMEOUT' })
    await sleep(0)
    expect(events.of(late).find((e) => e.kind === 'error').ctx).toMatchObject({ code: 'REFRESH_TIMEOUT', reason: 'expired' })

    const invalid = uid()
    await expect(m.getValidToken(invalid, expired(invalid), async () => ({ nope: true }))).rejects.toMatchObject({ code: 'INVALID_REFRESH_RESULT' })
    await sleep(0)
    expect(events.of(invalid).find((e) => e.kind === 'error').ctx.code).toBe('INVALID_REFRESH_RESULT')
  })

  it('names the native refreshers: tarabut and oauth2 (with the provider’s error code)', async () => {
    events = subscribeAll()
    const api = await startTarabutServer()
    try {
      const m = new TokenManager()
      const tarabut = tarabutRefresher({ clientId: api.clientId, clientSecret: secret(api.clientSecret), tokenUrl: api.tokenUrl })
      const ok = uid()
      const r = await m.getValidToken(ok, expired(ok), tarabut)
      secret(r.accessToken)
      const refused = uid()
      api.inject({ status: 401 }, { userId: refused })
      await expect(m.getValidToken(refused, expired(refused), tarabut)).rejects.toMatchObject({ code: 'INVALID_CLIENT' })
      const closed = await freePort()
      const oauth2 = oauth2Refresher({ tokenUrl: `http://127.0.0.1:${closed}/token`, clientId: 'id', clientSecret: secret('oauth2-client-secret') })
      const down = uid()
      await expect(m.getValidToken(down, expired(down), oauth2)).rejects.toMatchObject({ code: 'REFRESH_FAILED' })
      await sleep(0)
      expect(events.of(ok)[2].ctx).toMatchObject({ refresher: 'tarabut', waiters: 1 })
      expect(events.of(ok)[2].ctx.code).toBeUndefined()
      expect(events.of(refused).find((e) => e.kind === 'error').ctx).toMatchObject({ refresher: 'tarabut', code: 'INVALID_CLIENT' })
      expect(events.of(down).find((e) => e.kind === 'error').ctx).toMatchObject({ refresher: 'oauth2', code: 'REFRESH_FAILED' })
      // A function wrapping a native refresher is the caller's own.
      const wrapped = uid()
      await m.getValidToken(wrapped, expired(wrapped), (ctx) => tarabut(ctx))
      expect(events.of(wrapped)[0].ctx.refresher).toBe('custom')
    } finally {
      await api.close()
    }
  })

  it('a token served from the cache, or the caller’s own, runs no refresh and publishes none', async () => {
    events = subscribeAll()
    const m = new TokenManager()
    const user = uid()
    await m.getValidToken(user, valid(user), refresher())
    const due = inBuffer(user)
    const first = await m.getValidToken(user, due, refresher())
    secret(first.accessToken)
    await m.getValidToken(user, due, refresher()) // handed the held token
    expect(events.of(user).filter((e) => e.kind === 'start')).toHaveLength(1)
  })
})

describe('diagnostics_channel: stale-served and invalidate', () => {
  it('stale-served: a caller kept its own token after a failed refresh, with the failure’s code', async () => {
    events = subscribeAll()
    const m = new TokenManager()
    const user = uid()
    const token = inBuffer(user)
    const r = await m.getValidToken(user, token, refresher({ fail: new Error('provider down') }))
    expect(r.accessToken).toBe(token.accessToken)
    expect(events.plain).toEqual([{ name: 'tarabut-token-manager:stale-served', message: { userId: user, code: 'REFRESH_FAILED' } }])
  })

  it('invalidate: the user and whether one token or all of the user’s were marked', () => {
    events = subscribeAll()
    const m = new TokenManager()
    const user = uid()
    m.invalidate(user, secret('a-token-the-api-refused'))
    m.invalidate(user)
    expect(events.plain.map((e) => e.message)).toEqual([
      { userId: user, scope: 'token' },
      { userId: user, scope: 'user' },
    ])
    expect(() => m.invalidate('')).toThrow(TypeError)
    expect(events.plain).toHaveLength(2)
  })
})

describe('with Redis', () => {
  let redis
  const key = newKey()
  const managers = []
  beforeAll(async () => {
    redis = await startRedis()
  })
  afterEach(async () => {
    await Promise.all(managers.splice(0).map((m) => m.close()))
  })
  afterAll(async () => {
    await redis?.stop()
  })

  it("coordination 'redis' under the lock; a token another instance refreshed runs no refresh here", async () => {
    events = subscribeAll()
    const a = new TokenManager({ redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
    const b = new TokenManager({ redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
    managers.push(a, b)
    const user = uid()
    const token = expired(user)
    const r = await a.getValidToken(user, token, refresher())
    await b.getValidToken(user, token, refresher())
    secret(r.accessToken)
    await sleep(0)
    expect(events.of(user).map((e) => e.kind)).toEqual(['start', 'end', 'asyncStart', 'asyncEnd'])
    expect(events.of(user)[0].ctx.coordination).toBe('redis')
  })

  it("Redis down: redis-fallback (never the URL or its password), coordination 'redis-fallback', and the warning through the logger", async () => {
    events = subscribeAll()
    const port = await freePort()
    const password = secret('redis-password-never-published')
    const url = secret(`redis://:${password}@127.0.0.1:${port}`)
    const logger = { warn: vi.fn(), error: vi.fn() }
    const processWarnings = vi.fn()
    process.on('warning', processWarnings)
    try {
      // 'local': a refresh that spends a refresh token falls back too ('auto' would refuse it).
      const m = new TokenManager({ refreshTimeoutMs: 5_000, logger, redis: { url, encryptionKey: secret(key), userIdKey: USER_ID_KEY, onError: 'local' } })
      managers.push(m)
      const user = uid()
      await m.getValidToken(user, expired(user), refresher())
      await sleep(0)
      expect(events.of(user)[0].ctx.coordination).toBe('redis-fallback')
      const fallbacks = events.plain.filter((e) => e.name === 'tarabut-token-manager:redis-fallback')
      expect(fallbacks).toHaveLength(1)
      expect(fallbacks[0].message).toMatchObject({ userId: user, phase: 'refresh' })
      expect(fallbacks[0].message.reason).toEqual(expect.any(String))
      expect(m.stats().redisFallbacks).toBe(1)
      expect(logger.warn).toHaveBeenCalledTimes(1)
      expect(logger.warn.mock.calls[0][0]).toEqual({ code: 'TTM_REDIS_UNAVAILABLE' })
      expect(logger.warn.mock.calls[0][1]).toMatch(/^tarabut-token-manager: .*in-process only/)
      expectNoSecret(logger.warn.mock.calls)
      expect(logger.error).not.toHaveBeenCalled()
      expectNoSecret(await m.metrics())
      await sleep(10)
      expect(processWarnings).not.toHaveBeenCalled()
    } finally {
      process.off('warning', processWarnings)
    }
  })
})

describe('logger', () => {
  it('takes pino: one JSON line with the stable code and the message', async () => {
    const lines = []
    const stream = new Writable({
      write(chunk, _enc, cb) {
        lines.push(JSON.parse(chunk.toString()))
        cb()
      },
    })
    const logger = pino({ level: 'warn' }, stream)
    const m = new TokenManager({ logger, refreshTimeoutMs: 5_000, redis: { url: `redis://127.0.0.1:${await freePort()}`, encryptionKey: newKey(), userIdKey: USER_ID_KEY, onError: 'local' } })
    try {
      const user = uid()
      await m.getValidToken(user, expired(user), refresher())
      await sleep(10)
      expect(lines).toHaveLength(1)
      expect(lines[0]).toMatchObject({ level: 40, code: 'TTM_REDIS_UNAVAILABLE', msg: expect.stringMatching(/^tarabut-token-manager: /) })
    } finally {
      await m.close()
    }
  })

  it('refuses what is not a logger, with INVALID_ARGUMENT', () => {
    for (const logger of ['console', 1, { warn() {} }, { warn: 1, error() {} }]) {
      expect(() => new TokenManager({ logger })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT' }))
    }
    expect(() => new TokenManager({ logger: console })).not.toThrow()
    expect(() => new TokenManager({ openTelemetry: { meterProvider: {} } })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    expect(() => new TokenManager({ openTelemetry: 'yes' })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
  })
})

// --- OpenTelemetry ---------------------------------------------------------

/** A MeterProvider whose metrics the test reads on demand (cumulative). */
function meterProvider() {
  const exporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE)
  const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3_600_000 })
  const provider = new MeterProvider({ readers: [reader] })
  return {
    provider,
    /** name -> data points of the newest export. */
    async read() {
      exporter.reset()
      await reader.forceFlush()
      const out = {}
      for (const rm of exporter.getMetrics()) {
        for (const sm of rm.scopeMetrics) {
          expect(sm.scope.name).toBe('tarabut-token-manager')
          for (const md of sm.metrics) out[md.descriptor.name] = md
        }
      }
      return out
    },
  }
}

function tracerProvider() {
  const exporter = new InMemorySpanExporter()
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
  return { provider, spans: () => exporter.getFinishedSpans() }
}

const point = (md, attrs) => md.dataPoints.find((p) => Object.entries(attrs).every(([k, v]) => p.attributes[k] === v))

describe('OpenTelemetry, with explicit providers', () => {
  it('spans carry no user id unless openTelemetry.recordUserId is true; the tracing channel keeps it (in-process)', async () => {
    const tp = tracerProvider()
    const m = new TokenManager({ openTelemetry: { tracerProvider: tp.provider } })
    const user = `person-${uid()}@example.com`
    const seen = []
    const onStart = (message) => seen.push(message.userId)
    dc.tracingChannel('tarabut-token-manager:refresh').start.subscribe(onStart)
    try {
      await m.getValidToken(user, expired(user), refresher())
    } finally {
      dc.tracingChannel('tarabut-token-manager:refresh').start.unsubscribe(onStart)
    }
    const spans = tp.spans()
    expect(spans).toHaveLength(1)
    expect(spans[0].attributes).toMatchObject({ reason: 'expired', refresher: 'custom', outcome: 'ok' })
    expect(JSON.stringify(spans.map((s) => ({ attributes: s.attributes, events: s.events, name: s.name })))).not.toContain(user)
    expect(seen).toEqual([user])
    expect(() => new TokenManager({ openTelemetry: { recordUserId: 'yes' } })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT' }))
    await m.close()
  })

  it('counts refreshes by outcome and refresher, times them in seconds, and reads the core’s counters', async () => {
    const mp = meterProvider()
    const tp = tracerProvider()
    // recordUserId: spans name the user only when the app asks (spans leave the process).
    const m = new TokenManager({ openTelemetry: { meterProvider: mp.provider, tracerProvider: tp.provider, recordUserId: true } })
    const users = [uid(), uid(), uid()]
    await Promise.all(users.map((u) => m.getValidToken(u, expired(u), refresher({ delayMs: 20 }))))
    const shared = uid()
    const token = expired(shared)
    await Promise.all([0, 1, 2].map(() => m.getValidToken(shared, token, refresher())))
    const failing = uid()
    await m.getValidToken(failing, expired(failing), refresher({ fail: new Error('down') })).catch(() => {})
    const stale = uid()
    await m.getValidToken(stale, inBuffer(stale), refresher({ fail: new Error('down') }))
    const hot = valid(uid())
    for (let i = 0; i < 5; i++) await m.getValidToken('hot-user', hot, refresher())

    const got = await mp.read()
    const refreshes = got['tarabut_token_manager.refreshes']
    expect(refreshes.descriptor).toMatchObject({ unit: '{refresh}', type: 'COUNTER' })
    expect(point(refreshes, { outcome: 'ok', refresher: 'custom' }).value).toBe(4)
    expect(point(refreshes, { outcome: 'REFRESH_FAILED', refresher: 'custom' }).value).toBe(2)
    const duration = got['tarabut_token_manager.refresh.duration']
    expect(duration.descriptor).toMatchObject({ unit: 's', type: 'HISTOGRAM' })
    const ok = point(duration, { outcome: 'ok', refresher: 'custom' }).value
    expect(ok.count).toBe(4)
    expect(ok.buckets.boundaries).toEqual(BUCKETS)
    expect(ok.sum).toBeGreaterThanOrEqual(3 * 0.015)
    expect(ok.sum).toBeLessThan(5)
    const stats = m.stats()
    const value = (name) => got[name].dataPoints[0].value
    expect(value('tarabut_token_manager.hits')).toBe(stats.hits)
    expect(stats.hits).toBeGreaterThanOrEqual(5)
    expect(value('tarabut_token_manager.coalesced')).toBe(2)
    expect(value('tarabut_token_manager.stale_served')).toBe(1)
    expect(value('tarabut_token_manager.redis.fallbacks')).toBe(0)
    expect(value('tarabut_token_manager.users')).toBe(stats.users)
    expect(value('tarabut_token_manager.in_flight')).toBe(0)
    expect(got['tarabut_token_manager.hits'].descriptor.type).toBe('OBSERVABLE_COUNTER')
    expect(got['tarabut_token_manager.users'].descriptor.type).toBe('OBSERVABLE_GAUGE')
    expectNoSecret(got)

    // One span per refresh, status set on failure.
    const spans = tp.spans()
    expect(spans).toHaveLength(6)
    expect(spans.every((s) => s.name === 'tarabut_token_manager.refresh')).toBe(true)
    const sharedSpan = spans.find((s) => s.attributes['user.id'] === shared)
    expect(sharedSpan.attributes).toEqual({ 'user.id': shared, reason: 'expired', refresher: 'custom', coordination: 'local', outcome: 'ok', waiters: 3 })
    expect(sharedSpan.status.code).toBe(0) // UNSET: OK is the application's to set
    const failed = spans.find((s) => s.attributes['user.id'] === failing)
    expect(failed.status).toEqual({ code: 2, message: 'REFRESH_FAILED' })
    expect(failed.attributes).toMatchObject({ outcome: 'REFRESH_FAILED', 'error.type': 'REFRESH_FAILED' })
    expectNoSecret(spans.map((s) => ({ name: s.name, attributes: s.attributes, status: s.status, events: s.events })))
    await mp.provider.shutdown()
  })

  it('two managers on one provider add up instead of overwriting each other', async () => {
    const mp = meterProvider()
    const a = new TokenManager({ openTelemetry: { meterProvider: mp.provider } })
    const b = new TokenManager({ openTelemetry: { meterProvider: mp.provider } })
    for (const m of [a, b]) {
      const u = uid()
      await m.getValidToken(u, expired(u), refresher())
    }
    const u = uid()
    await b.getValidToken(u, expired(u), refresher())
    const got = await mp.read()
    expect(got['tarabut_token_manager.users'].dataPoints[0].value).toBe(a.stats().users + b.stats().users)
    expect(got['tarabut_token_manager.users'].dataPoints[0].value).toBe(3)
    expect(point(got['tarabut_token_manager.refreshes'], { outcome: 'ok' }).value).toBe(3)
    await mp.provider.shutdown()
  })

  it('a broken provider never breaks a refresh: one logger.error, tokens as usual', async () => {
    const logger = { warn: vi.fn(), error: vi.fn() }
    const broken = {
      getMeter: () => {
        throw new Error('meter exploded')
      },
    }
    const m = new TokenManager({ logger, openTelemetry: { meterProvider: broken } })
    for (let i = 0; i < 3; i++) {
      const u = uid()
      await expect(m.getValidToken(u, expired(u), refresher())).resolves.toMatchObject({ shouldUpdate: true })
    }
    expect(logger.error).toHaveBeenCalledTimes(1)
    expect(logger.error.mock.calls[0][0]).toEqual({ code: 'TTM_OBSERVABILITY_FAILED' })
    expect(m.stats().refreshes).toBe(3)
  })

  it('openTelemetry: false leaves OpenTelemetry alone', async () => {
    const mp = meterProvider()
    metrics.setGlobalMeterProvider(mp.provider)
    try {
      const m = new TokenManager({ openTelemetry: false })
      const u = uid()
      await m.getValidToken(u, expired(u), refresher())
      expect(await mp.read()).toEqual({})
    } finally {
      metrics.disable()
      await mp.provider.shutdown()
    }
  })
})

describe('OpenTelemetry, through the global providers', () => {
  let mp
  let tp
  beforeAll(() => {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
  })
  afterEach(async () => {
    metrics.disable()
    trace.disable()
    await mp?.provider.shutdown()
  })
  afterAll(() => {
    context.disable()
  })

  it('a manager made before the SDK registered picks it up at its next refresh; spans a refresh function starts are children', async () => {
    const m = new TokenManager()
    mp = meterProvider()
    tp = tracerProvider()
    metrics.setGlobalMeterProvider(mp.provider)
    trace.setGlobalTracerProvider(tp.provider)
    const user = uid()
    await m.getValidToken(user, expired(user), async (ctx) => {
      // The application's own instrumented call (an HTTP client span).
      return trace.getTracer('app').startActiveSpan('POST /token', async (span) => {
        await sleep(5)
        span.end()
        return { accessToken: secret(`at-${ctx.userId}-${Math.random()}`), expiresIn: 3600 }
      })
    })
    const got = await mp.read()
    expect(point(got['tarabut_token_manager.refreshes'], { outcome: 'ok', refresher: 'custom' }).value).toBe(1)
    const spans = tp.spans()
    const refresh = spans.find((s) => s.name === 'tarabut_token_manager.refresh')
    const http = spans.find((s) => s.name === 'POST /token')
    expect(refresh.instrumentationScope.name).toBe('tarabut-token-manager')
    expect(http.parentSpanContext?.spanId ?? http.parentSpanId).toBe(refresh.spanContext().spanId)
    expect(http.spanContext().traceId).toBe(refresh.spanContext().traceId)
  })

  it('a provider registered after some refreshes gets their counts too (from the manager’s start, as metrics() has them)', async () => {
    const m = new TokenManager()
    for (const fail of [undefined, new Error('down')]) {
      const u = uid()
      await m.getValidToken(u, expired(u), refresher({ fail })).catch(() => {})
    }
    mp = meterProvider()
    metrics.setGlobalMeterProvider(mp.provider)
    const u = uid()
    await m.getValidToken(u, expired(u), refresher())
    const got = await mp.read()
    expect(point(got['tarabut_token_manager.refreshes'], { outcome: 'ok', refresher: 'custom' }).value).toBe(2)
    expect(point(got['tarabut_token_manager.refreshes'], { outcome: 'REFRESH_FAILED', refresher: 'custom' }).value).toBe(1)
    // Durations only of what it saw.
    expect(point(got['tarabut_token_manager.refresh.duration'], { outcome: 'ok', refresher: 'custom' }).value.count).toBe(1)
  })
})

// --- Prometheus ------------------------------------------------------------

/** metrics() parsed by parse-prometheus-text-format: name -> family; `series` reads one histogram series. */
async function scrape(m) {
  const text = await m.metrics()
  expectNoSecret(text)
  const families = Object.fromEntries(parsePrometheusTextFormat(text).map((f) => [f.name, f]))
  Object.defineProperty(families, 'series', { value: (name, labels) => histogramSeries(text, name, labels) })
  return families
}

/**
 * One series of histogram `name` (its buckets, sum and count), parsed on its
 * own and without its labels: the parser reads only unlabelled histograms
 * (it folds labelled series into one and drops their sums and counts).
 */
function histogramSeries(text, name, labels) {
  const pairs = Object.entries(labels).map(([k, v]) => `${k}="${v}"`)
  const lines = text
    .split('\n')
    .filter((l) => l === `# TYPE ${name} histogram` || (l.startsWith(`${name}_`) && pairs.every((p) => l.includes(p))))
    .map((l) => pairs.reduce((line, p) => line.replace(`,${p}`, '').replace(`${p},`, '').replace(p, ''), l).replace('{}', ''))
  const [family] = parsePrometheusTextFormat(lines.join('\n') + '\n')
  expect(family.type).toBe('HISTOGRAM')
  expect(family.metrics).toHaveLength(1)
  return family.metrics[0]
}

describe('metrics(): Prometheus text exposition format', () => {
  it('every metric with HELP and TYPE; refreshes by outcome and refresher; durations in 5 ms to 30 s buckets; values as stats() says', async () => {
    const m = new TokenManager()
    // Scraped from the start, as Prometheus does: durations are recorded from the first metrics() on.
    await m.metrics()
    const api = await startTarabutServer()
    try {
      const tarabut = tarabutRefresher({ clientId: api.clientId, clientSecret: secret(api.clientSecret), tokenUrl: api.tokenUrl })
      for (let i = 0; i < 3; i++) {
        const u = uid()
        secret((await m.getValidToken(u, expired(u), tarabut)).accessToken)
      }
      const refused = uid()
      api.inject({ status: 401 }, { userId: refused })
      await m.getValidToken(refused, expired(refused), tarabut).catch(() => {})
      const shared = uid()
      const token = expired(shared)
      const results = await Promise.all([0, 1].map(() => m.getValidToken(shared, token, refresher({ delayMs: 10 }))))
      secret(results[0].accessToken)
      const stale = uid()
      await m.getValidToken(stale, inBuffer(stale), refresher({ fail: new Error('down') }))
      const hot = valid(uid())
      for (let i = 0; i < 4; i++) await m.getValidToken('hot', hot, refresher())
      expect(api.tokenRequests).toBe(4)

      const f = await scrape(m)
      const stats = m.stats()
      expect(Object.keys(f).sort()).toEqual(
        [
          'tarabut_token_manager_background_refreshes_total',
          'tarabut_token_manager_store_save_failures_total',
          'tarabut_token_manager_store_unsaved_tokens',
          'tarabut_token_manager_coalesced_total',
          'tarabut_token_manager_hits_total',
          'tarabut_token_manager_in_flight',
          'tarabut_token_manager_redis_fallbacks_total',
          'tarabut_token_manager_redis_notices_dropped_total',
          'tarabut_token_manager_refresh_duration_seconds',
          'tarabut_token_manager_refreshes_total',
          'tarabut_token_manager_stale_served_total',
          'tarabut_token_manager_users',
        ].sort(),
      )
      for (const family of Object.values(f)) expect(family.help.length).toBeGreaterThan(10)
      const refreshes = f.tarabut_token_manager_refreshes_total
      expect(refreshes.type).toBe('COUNTER')
      const count = (outcome, refresher) => Number(refreshes.metrics.find((s) => s.labels.outcome === outcome && s.labels.refresher === refresher)?.value ?? 0)
      expect(count('ok', 'tarabut')).toBe(3)
      expect(count('INVALID_CLIENT', 'tarabut')).toBe(1)
      expect(count('ok', 'custom')).toBe(1)
      expect(count('REFRESH_FAILED', 'custom')).toBe(1)
      // Refreshes that ran here = token requests the provider saw.
      const tarabutTotal = refreshes.metrics.filter((s) => s.labels.refresher === 'tarabut').reduce((n, s) => n + Number(s.value), 0)
      expect(tarabutTotal).toBe(api.tokenRequests)

      const duration = f.tarabut_token_manager_refresh_duration_seconds
      expect(duration.type).toBe('HISTOGRAM')
      const okTarabut = f.series('tarabut_token_manager_refresh_duration_seconds', { outcome: 'ok', refresher: 'tarabut' })
      expect(Object.keys(okTarabut.buckets).map((le) => (le === '+Inf' ? Infinity : Number(le))).sort((a, b) => a - b)).toEqual([...BUCKETS, Infinity])
      expect(Number(okTarabut.count)).toBe(3)
      expect(Number(okTarabut.buckets['+Inf'])).toBe(3)
      expect(Number(okTarabut.sum)).toBeGreaterThan(0)
      expect(Number(okTarabut.sum)).toBeLessThan(30)
      const refusedSeries = f.series('tarabut_token_manager_refresh_duration_seconds', { outcome: 'INVALID_CLIENT', refresher: 'tarabut' })
      expect(Number(refusedSeries.count)).toBe(1)

      const one = (name) => Number(f[name].metrics[0].value)
      expect(f.tarabut_token_manager_users.type).toBe('GAUGE')
      expect(one('tarabut_token_manager_users')).toBe(stats.users)
      expect(one('tarabut_token_manager_in_flight')).toBe(0)
      expect(f.tarabut_token_manager_hits_total.type).toBe('COUNTER')
      expect(one('tarabut_token_manager_hits_total')).toBe(stats.hits)
      expect(one('tarabut_token_manager_coalesced_total')).toBe(1)
      expect(one('tarabut_token_manager_stale_served_total')).toBe(1)
      expect(one('tarabut_token_manager_redis_fallbacks_total')).toBe(0)

      // Counters only grow between scrapes.
      await m.getValidToken('hot', hot, refresher())
      const again = await scrape(m)
      expect(Number(again.tarabut_token_manager_hits_total.metrics[0].value)).toBe(stats.hits + 1)
    } finally {
      await api.close()
    }
  })

  // Prometheus's own linter, where it is installed (Debian: apt-get install prometheus).
  const promtool = spawnSync('promtool', ['--version']).status === 0
  it.skipIf(!promtool)('passes `promtool check metrics`', async () => {
    const m = new TokenManager()
    for (const fail of [undefined, new Error('down')]) {
      const u = uid()
      await m.getValidToken(u, expired(u), refresher({ fail })).catch(() => {})
    }
    const checked = spawnSync('promtool', ['check', 'metrics'], { input: await m.metrics(), encoding: 'utf8', timeout: 10_000 })
    expect({ status: checked.status, out: checked.stdout + checked.stderr }).toEqual({ status: 0, out: '' })
  })

  it('refreshes before the first metrics() are counted, not timed; later ones are timed too', async () => {
    const m = new TokenManager()
    for (let i = 0; i < 2; i++) {
      const u = uid()
      await m.getValidToken(u, expired(u), refresher())
    }
    const ok = (f) => Number(f.tarabut_token_manager_refreshes_total.metrics.find((s) => s.labels.outcome === 'ok')?.value)
    const first = await scrape(m)
    expect(ok(first)).toBe(2)
    expect(first.tarabut_token_manager_refresh_duration_seconds.metrics).toHaveLength(0)
    const u = uid()
    await m.getValidToken(u, expired(u), refresher({ delayMs: 10 }))
    const second = await scrape(m)
    expect(ok(second)).toBe(3)
    const timed = second.series('tarabut_token_manager_refresh_duration_seconds', { outcome: 'ok', refresher: 'custom' })
    expect(Number(timed.count)).toBe(1)
    expect(Number(timed.sum)).toBeGreaterThanOrEqual(0.005)
  })

  it('each manager has its own registry; a fresh one scrapes zeros', async () => {
    const a = new TokenManager()
    const b = new TokenManager()
    const u = uid()
    await a.getValidToken(u, expired(u), refresher())
    const fa = await scrape(a)
    const fb = await scrape(b)
    expect(fa.tarabut_token_manager_refreshes_total.metrics).toHaveLength(1)
    expect(fb.tarabut_token_manager_refreshes_total.metrics).toHaveLength(0)
    expect(Number(fb.tarabut_token_manager_users.metrics[0].value)).toBe(0)
  })
})

// --- cost and absence --------------------------------------------------------

const run = promisify(execFile)
/** Runs `code` (ESM) in a fresh Node process with the package at hand; resolves with its JSON output. */
async function inChild(code, { hide } = {}) {
  const args = hide ? ['--require', fileURLToPath(new URL('./helpers/hide-modules.cjs', import.meta.url))] : []
  const env = { ...process.env, HIDE_MODULES: hide ?? '' }
  const { stdout } = await run(process.execPath, [...args, '--input-type=module', '-e', code], { cwd: pkg, env, timeout: 30_000 })
  return JSON.parse(stdout.trim().split('\n').pop())
}

describe('nothing is loaded until it is needed, and @opentelemetry/api is optional', () => {
  it('the hot path loads neither @opentelemetry/api nor prom-client; a refresh loads the API after its answer (to ask for a registered provider), never prom-client; the first metrics() loads prom-client', async () => {
    const out = await inChild(`
      import { createRequire } from 'node:module'
      const require = createRequire(process.cwd() + '/')
      const { TokenManager } = require('./index.js')
      const loaded = (name) => Object.keys(require.cache).some((k) => k.includes('/node_modules/' + name + '/'))
      const m = new TokenManager()
      for (let i = 0; i < 100; i++) await m.getValidToken('u', { accessToken: 'a', expiresAt: Date.now() + 3_600_000 }, () => {})
      const hot = { otel: loaded('@opentelemetry/api'), prom: loaded('prom-client') }
      await m.getValidToken('v', { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b', expiresIn: 3600 }))
      const answered = loaded('@opentelemetry/api')
      await new Promise((r) => setImmediate(r))
      const refreshed = { otel: loaded('@opentelemetry/api'), prom: loaded('prom-client') }
      await m.metrics()
      const scraped = { otel: loaded('@opentelemetry/api'), prom: loaded('prom-client') }
      console.log(JSON.stringify({ hot, answered, refreshed, scraped }))
    `)
    expect(out).toEqual({ hot: { otel: false, prom: false }, answered: false, refreshed: { otel: true, prom: false }, scraped: { otel: true, prom: true } })
  })

  it('without @opentelemetry/api installed (and a provider registered by someone): refreshes, channels and metrics() work, nothing is logged', async () => {
    const out = await inChild(
      `
      import { createRequire } from 'node:module'
      const require = createRequire(process.cwd() + '/')
      globalThis[Symbol.for('opentelemetry.js.api.1')] = { version: '1.9.0' }
      let apiLoads = 0
      try { require('@opentelemetry/api') } catch (e) { apiLoads = e.code }
      const warnings = []
      process.on('warning', (w) => warnings.push(w.code))
      const { TokenManager } = require('./index.js')
      const m = new TokenManager()
      const r = await m.getValidToken('v', { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b', expiresIn: 3600 }))
      const text = await m.metrics()
      await new Promise((r) => setTimeout(r, 10))
      console.log(JSON.stringify({ apiLoads, token: r.accessToken, counted: text.includes('tarabut_token_manager_refreshes_total{outcome="ok",refresher="custom"} 1'), warnings }))
    `,
      { hide: '@opentelemetry/api' },
    )
    expect(out).toEqual({ apiLoads: 'MODULE_NOT_FOUND', token: 'b', counted: true, warnings: [] })
  })

  it('prom-client failing to load breaks no refresh: metrics() rejects with the cause', async () => {
    const out = await inChild(
      `
      import { createRequire } from 'node:module'
      const require = createRequire(process.cwd() + '/')
      const { TokenManager } = require('./index.js')
      const errors = []
      const m = new TokenManager({ logger: { warn() {}, error: (fields) => errors.push(fields.code) } })
      const tokens = []
      for (let i = 0; i < 3; i++) {
        const r = await m.getValidToken('v' + i, { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b' + i, expiresIn: 3600 }))
        tokens.push(r.accessToken)
        await new Promise((r) => setImmediate(r))
      }
      const scraped = await m.metrics().then(() => 'resolved', (e) => e.code)
      console.log(JSON.stringify({ tokens, errors, scraped, refreshes: m.stats().refreshes }))
    `,
      { hide: 'prom-client' },
    )
    expect(out).toEqual({ tokens: ['b0', 'b1', 'b2'], errors: [], scraped: 'MODULE_NOT_FOUND', refreshes: 3 })
  })
})

// --- docs/observability.md ------------------------------------------------------------------

describe('docs/observability.md', () => {
  const section = readFileSync(new URL('../docs/observability.md', import.meta.url), 'utf8')
  const blocks = [...section.matchAll(/```\w+\n([\s\S]*?)```/g)].map((m) => m[1])

  it('shows three snippets; the Next.js ones are the example files the e2e runs', () => {
    expect(blocks).toHaveLength(3)
    expect(blocks[1]).toBe(readFileSync(new URL('../examples/nextjs/instrumentation.ts', import.meta.url), 'utf8'))
    expect(blocks[2]).toBe(readFileSync(new URL('../examples/nextjs/app/api/metrics/route.ts', import.meta.url), 'utf8'))
  })

  it('the diagnostics_channel snippet prints a line per refresh and per stale serve', async () => {
    // Inside the package, so that `import 'tarabut-token-manager'` resolves to it.
    const file = fileURLToPath(new URL(`./.readme-snippet-${process.pid}.mjs`, import.meta.url))
    const driver = `
      import { TokenManager } from 'tarabut-token-manager'
      const m = new TokenManager()
      const expired = { accessToken: 'old', expiresAt: Date.now() - 1_000 }
      await Promise.all([1, 2, 3].map(() => m.getValidToken('alice', expired, async () => ({ accessToken: 'new', expiresIn: 3600 }))))
      await m.getValidToken('bob', { accessToken: 'due', expiresAt: Date.now() + 60_000 }, async () => {
        throw new Error('provider down')
      })
    `
    writeFileSync(file, blocks[0] + driver)
    try {
      const { stdout } = await run(process.execPath, [file], { cwd: pkg, timeout: 30_000 })
      const lines = stdout.trim().split('\n').sort()
      expect(lines).toHaveLength(3)
      expect(lines[0]).toMatch(/^refresh alice: ok in \d+ ms, expired, custom, local, served 3$/)
      expect(lines[1]).toMatch(/^refresh bob: REFRESH_FAILED in \d+ ms, buffer, custom, local, served 1$/)
      expect(lines[2]).toBe('stale-served bob after REFRESH_FAILED')
    } finally {
      rmSync(file, { force: true })
    }
  })
})
