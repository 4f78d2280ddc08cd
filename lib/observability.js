'use strict'
// What every refresh did, for the tools production teams already run
// (docs/observability.md). lib/manager.js and lib/coordination.js call the
// hooks of one Observer per manager; everything else lives here:
// - node:diagnostics_channel: a tracing channel around each refresh this
//   process runs, plain channels for stale serves, Redis fallbacks and
//   invalidations, each published only when it has subscribers;
// - OpenTelemetry through `@opentelemetry/api` (an optional peer
//   dependency, looked for from the first refresh on, never at startup),
//   used once the application registered a provider (or passed its own);
// - Prometheus text (`metrics()`) through prom-client, loaded at the first
//   scrape;
// - the logger every warning goes through.
// Both metric outputs come from one table (METRICS). Nobody listening costs
// a refresh one small object and a count: no clock read, no closure. The hot
// path is untouched: its hits are read from the core's counter when metrics
// are collected. No message, metric or span holds a token, a secret or a
// Redis URL: they carry a user id, why, how and what came of it.

const dc = require('node:diagnostics_channel')
const { setImmediate } = require('node:timers')
const { argError } = require('./errors.js')
const { ownMethod, ownOptions } = require('./options.js')

const NAME = 'tarabut-token-manager'
const refreshChannel = dc.tracingChannel(`${NAME}:refresh`)
const staleServedChannel = dc.channel(`${NAME}:stale-served`)
const redisFallbackChannel = dc.channel(`${NAME}:redis-fallback`)
const invalidateChannel = dc.channel(`${NAME}:invalidate`)
const saveFailedChannel = dc.channel(`${NAME}:save-failed`)

/** Refresh duration buckets in seconds, for token calls: 5 ms to 30 s. */
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

/** Where a refresh function comes from: lib/refreshers.js marks its own. */
const REFRESHER_KIND = Symbol('tarabut-token-manager.refresherKind')

/**
 * Every metric, for both outputs. `name` is OpenTelemetry's after
 * `tarabut_token_manager.`; Prometheus's is the same with underscores,
 * `_seconds` for a unit of seconds and `_total` for a counter. `stat`: read
 * from `stats()` when collected (observable); otherwise recorded per refresh
 * run here, labelled by outcome (ok or the error code) and refresher.
 */
const METRICS = [
  { name: 'refreshes', type: 'counter', unit: '{refresh}', help: 'Refreshes this process ran, by outcome (ok or the error code) and refresher' },
  { name: 'refresh.duration', type: 'histogram', unit: 's', help: 'Duration of the refreshes this process ran, by outcome and refresher' },
  { name: 'users', type: 'gauge', unit: '{user}', help: 'Users the token manager holds state for', stat: 'users' },
  { name: 'in_flight', type: 'gauge', unit: '{refresh}', help: 'Refreshes running now', stat: 'inFlight' },
  { name: 'hits', type: 'counter', unit: '{call}', help: 'Calls answered without a refresh', stat: 'hits' },
  { name: 'coalesced', type: 'counter', unit: '{call}', help: "Calls that waited on another call's refresh", stat: 'coalesced' },
  { name: 'stale_served', type: 'counter', unit: '{call}', help: 'Calls served their own still-valid token after a refresh failed', stat: 'staleServed' },
  { name: 'redis.fallbacks', type: 'counter', unit: '{refresh}', help: 'Refreshes coordinated in-process only because Redis was unavailable', stat: 'redisFallbacks' },
  { name: 'background_refreshes', type: 'counter', unit: '{refresh}', help: 'Refreshes ahead of need this process ran for active users (options.store and options.refresher)', stat: 'backgroundRefreshes' },
  { name: 'store.save_failures', type: 'counter', unit: '{save}', help: 'Failed attempts to save a refreshed token to options.store (each retried)', stat: 'saveFailures' },
  { name: 'store.unsaved_tokens', type: 'gauge', unit: '{token}', help: 'Refreshed tokens held until their save to options.store succeeds', stat: 'unsavedTokens' },
  { name: 'redis.notices_dropped', type: 'counter', unit: '{notice}', help: 'Redis channel messages dropped: unsigned or signed with another key, stale, replayed, oversized', stat: 'redisNoticesDropped' },
]
const LABELS = ['outcome', 'refresher']
const promName = (m) => `tarabut_token_manager_${m.name.replaceAll('.', '_')}${m.unit === 's' ? '_seconds' : ''}${m.type === 'counter' ? '_total' : ''}`
const OBSERVED = METRICS.filter((m) => m.stat !== undefined)

/** Warnings go where they always went: process warnings with a stable code. */
const processWarnings = {
  warn: (fields, message) => process.emitWarning(message, { code: fields.code }),
  error: (fields, message) => process.emitWarning(message, { code: fields.code }),
}

/** What `options.openTelemetry` takes: any other key is a TypeError naming it. */
const OTEL_OPTIONS = ['meterProvider', 'tracerProvider', 'recordUserId']

/**
 * `options.logger` and `options.openTelemetry`: TypeError on a bad one.
 * Replaces `o.openTelemetry` with its own properties, read once (a
 * null-prototype copy: lib/options.js). A logger's and a provider's methods
 * count only where their own object or class has them, never on
 * Object.prototype (`ownMethod`).
 */
function checkOptions(o) {
  const logger = o.logger
  if (logger !== undefined && logger !== null) {
    if (typeof logger !== 'object' && typeof logger !== 'function') {
      throw argError('options.logger', 'must be an object with warn and error methods (console and pino loggers fit)')
    }
    for (const m of ['warn', 'error']) {
      if (ownMethod(logger, m) === undefined) throw argError(`options.logger.${m}`, 'must be a function')
    }
  }
  const otel = o.openTelemetry
  if (otel === undefined || otel === null || otel === false) return
  if (typeof otel !== 'object') throw argError('options.openTelemetry', 'must be false or an object { meterProvider?, tracerProvider?, recordUserId? }')
  const own = ownOptions(otel, OTEL_OPTIONS, 'options.openTelemetry', 'openTelemetry')
  if (own.meterProvider != null && ownMethod(own.meterProvider, 'getMeter') === undefined) {
    throw argError('options.openTelemetry.meterProvider', 'must be a MeterProvider (with getMeter)')
  }
  if (own.tracerProvider != null && ownMethod(own.tracerProvider, 'getTracer') === undefined) {
    throw argError('options.openTelemetry.tracerProvider', 'must be a TracerProvider (with getTracer)')
  }
  if (own.recordUserId !== undefined && typeof own.recordUserId !== 'boolean') throw argError('options.openTelemetry.recordUserId', 'must be a boolean')
  o.openTelemetry = own
}

/**
 * A logger's `name` method, called with the logger as `this`: looked up at
 * each call (pino swaps its level methods when its level changes), never
 * from Object.prototype.
 */
function logWith(logger, name, fields, message) {
  const fn = ownMethod(logger, name)
  if (fn !== undefined) Reflect.apply(fn, logger, [fields, message])
}

/** Why the leader's call refreshed, from the token it presented and the caller's clock then. */
function refreshReason(noToken, expiresAtMs, bufferMs, nowMs) {
  if (noToken) return 'no-token'
  const left = expiresAtMs - nowMs
  if (left <= 0) return 'expired'
  // The core led although the token outlives the buffer: it was invalidated.
  return left > bufferMs ? 'invalidated' : 'buffer'
}

/** An error's stable code, as metrics and spans label outcomes. */
function codeOf(error) {
  return typeof error?.code === 'string' ? error.code : 'REFRESH_FAILED'
}

// --- OpenTelemetry --------------------------------------------------------

/**
 * The API (with the no-op tracer provider, which the global one delegates to
 * while no SDK is registered): undefined until looked for, null if it is not
 * installed, PENDING while its load waits.
 */
let otel
const PENDING = Symbol('loading')
function loadOtel() {
  try {
    const api = require('@opentelemetry/api')
    otel = { api, noTracers: new api.ProxyTracerProvider().getDelegate() }
  } catch {
    otel = null
  }
}

/**
 * @opentelemetry/api, if installed: at once if something loaded it already
 * (as registering an SDK does) or `now` (providers were passed in), else
 * after the current task (timers' own setImmediate, which fake timers leave
 * alone), so that a process's first refresh does not wait for its sixty
 * files. A provider that copy cannot see yet (a bundled copy registered it)
 * is seen from then on, and gets the refresh counts so far (`#attach`).
 */
function otelApi(now) {
  if (otel === undefined || (now && otel === PENDING)) {
    let path = null
    try {
      path = require.resolve('@opentelemetry/api')
    } catch {}
    if (path === null) otel = null
    else if (now || require.cache[path] !== undefined) loadOtel()
    else if (otel !== PENDING) {
      otel = PENDING
      setImmediate(loadOtel).unref()
    }
  }
  return otel === PENDING ? null : otel
}

let version
function packageVersion() {
  version ??= require('../package.json').version
  return version
}

/**
 * One set of instruments per MeterProvider, shared by the managers that use
 * it: the observable ones report the sum over those managers, so the
 * process-wide `tokenManager` and an application's own manager add up
 * instead of overwriting each other.
 */
const instrumentsByProvider = new WeakMap()

function instrumentsFor(meterProvider) {
  let ins = instrumentsByProvider.get(meterProvider)
  if (ins !== undefined) return ins
  const meter = meterProvider.getMeter(NAME, packageVersion())
  const make = { counter: 'createCounter', histogram: 'createHistogram' }
  const observe = { counter: 'createObservableCounter', gauge: 'createObservableGauge' }
  ins = { observers: new Set() }
  for (const m of METRICS) {
    const create = m.stat === undefined ? make[m.type] : observe[m.type]
    const advice = m.type === 'histogram' ? { explicitBucketBoundaries: DURATION_BUCKETS } : undefined
    ins[m.name] = meter[create](`tarabut_token_manager.${m.name}`, { description: m.help, unit: m.unit, advice })
  }
  // WeakRefs to the Observers reporting here: a dropped manager is not kept alive.
  const observers = ins.observers
  meter.addBatchObservableCallback(
    (result) => {
      const sums = OBSERVED.map(() => 0)
      for (const ref of observers) {
        const s = ref.deref()?.statsFor(meterProvider)
        if (s === undefined) observers.delete(ref)
        else OBSERVED.forEach((m, i) => (sums[i] += s[m.stat]))
      }
      OBSERVED.forEach((m, i) => result.observe(ins[m.name], sums[i]))
    },
    OBSERVED.map((m) => ins[m.name]),
  )
  instrumentsByProvider.set(meterProvider, ins)
  return ins
}

// --- Prometheus -------------------------------------------------------------

/**
 * A manager's prom-client Registry: refresh counts read from `counts`
 * (refresher -> outcome -> count, kept since the manager was made), the
 * core's counters from `snapshot()` (its stats() at scrape time). Returns it
 * with the durations histogram, which the manager observes from then on.
 */
function promRegistry(counts, snapshot) {
  const { Registry, Counter, Gauge, Histogram } = require('prom-client')
  const registry = new Registry()
  let durations
  for (const m of METRICS) {
    const config = { name: promName(m), help: m.help, registers: [registry] }
    if (m.type === 'histogram') {
      durations = new Histogram({ ...config, labelNames: LABELS, buckets: DURATION_BUCKETS })
    } else if (m.stat === undefined) {
      new Counter({
        ...config,
        labelNames: LABELS,
        collect() {
          this.reset()
          for (const [refresher, byOutcome] of counts) for (const [outcome, n] of byOutcome) this.inc({ outcome, refresher }, n)
        },
      })
    } else if (m.type === 'gauge') {
      new Gauge({
        ...config,
        collect() {
          this.set(snapshot()[m.stat])
        },
      })
    } else {
      new Counter({
        ...config,
        collect() {
          this.reset()
          this.inc(snapshot()[m.stat])
        },
      })
    }
  }
  return { registry, durations }
}

// --- One manager's observer -------------------------------------------------

/** One flight this manager leads. */
class RefreshTrace {
  constructor(refresher, detail) {
    this.refresher = refresher
    /** Its refresh started here (a flight with Redis may end without one). */
    this.ran = false
    this.settled = false
    /** performance.now() when its refresh started, if anyone wants its duration; else 0. */
    this.startedAt = 0
    /** What spans and channel subscribers see; null when neither listened as it was led. */
    this.detail = detail
  }
}

class Observer {
  #logger
  /**
   * false: OpenTelemetry off; null: the global providers; else explicit ones.
   * @type {false | null | { meterProvider: any, tracerProvider: any }}
   */
  #otelOption
  /** `openTelemetry.recordUserId`: spans carry `user.id` only when asked (spans leave the process). */
  #recordUserId = false
  #stats
  #bufferMs
  /** The flights a span or a subscriber sees, for `joined`. */
  #flights = new Map()
  /** refresher -> outcome -> refreshes run here that ended so. */
  #counts = new Map()
  // Prometheus, from the first scrape on.
  #registry = null
  #durations = null
  #snapshot = null
  #reportedFailure = false
  // OpenTelemetry: the providers last seen, and what this manager uses of them.
  #ref = new WeakRef(this)
  #meters = null
  #instruments = null
  #tracers = null
  #tracer = null

  /**
   * @param options the manager's options (checked by `checkOptions`)
   * @param stats the manager's `stats()`
   * @param bufferMs the effective `bufferTimeMs`
   */
  constructor(options, stats, bufferMs) {
    this.#logger = options.logger ?? processWarnings
    const otel = options.openTelemetry
    this.#otelOption =
      otel === false ? false : otel == null || (otel.meterProvider == null && otel.tracerProvider == null) ? null : { meterProvider: otel.meterProvider ?? null, tracerProvider: otel.tracerProvider ?? null }
    this.#recordUserId = otel?.recordUserId === true
    this.#stats = stats
    this.#bufferMs = bufferMs
    // Providers passed in are used at once; the global ones are looked for
    // from the first refresh on, so that startup loads nothing.
    if (this.#otelOption !== null) this.#attach()
  }

  /** A warning with a stable code, through the logger (pino's argument order). */
  warn(code, message) {
    try {
      logWith(this.#logger, 'warn', { code }, message)
    } catch {}
  }

  // --- hooks: lib/manager.js ---

  /** This manager leads flight `flightId`, decided at `nowMs` on the caller's clock (its refresh may run now, later or elsewhere). */
  lead(flightId, userId, accessToken, expiresAtMs, refreshFn, nowMs) {
    this.#attach()
    const refresher = refreshFn[REFRESHER_KIND] ?? 'custom'
    if (this.#tracer === null && !refreshChannel.hasSubscribers) return new RefreshTrace(refresher, null)
    const detail = { flightId, userId, noToken: accessToken.length === 0, expiresAtMs, nowMs, waiters: 1, span: null, channelContext: null }
    const trace = new RefreshTrace(refresher, detail)
    this.#flights.set(flightId, trace)
    return trace
  }

  /** A caller joined flight `flightId`. */
  joined(flightId) {
    const trace = this.#flights.get(flightId)
    if (trace !== undefined) trace.detail.waiters++
  }

  /**
   * Runs `refresh` (the refresh of `trace`'s flight): as it is when nobody
   * listens; else timed, and inside the tracing channel's start and an
   * OpenTelemetry span, both active while it runs (so spans of a refresh
   * function's own calls are children).
   */
  run(trace, coordination, refresh) {
    if (trace.ran) return refresh()
    trace.ran = true
    let call = refresh
    const detail = trace.detail
    if (detail !== null || this.#durations !== null || this.#instruments !== null) {
      trace.startedAt = performance.now()
      if (detail !== null) call = this.#traced(trace, detail, coordination, refresh)
    }
    const p = call()
    // The flight already gave up (its timeout passed while waiting for
    // Redis): this refresh ends on its own.
    if (trace.settled) p.then(() => this.#finish(trace, undefined), (e) => this.#finish(trace, e))
    return p
  }

  /** Flight of `trace` settled: `error` or undefined. */
  settled(trace, error) {
    trace.settled = true
    if (trace.detail !== null) this.#flights.delete(trace.detail.flightId)
    if (trace.ran) this.#finish(trace, error)
  }

  /** A caller got its own still-valid token back after `code` failed its refresh. */
  staleServed(userId, code) {
    this.#attach()
    if (staleServedChannel.hasSubscribers) staleServedChannel.publish({ userId, code })
  }

  /** `invalidate(userId, token?)`: `scope` 'token' (one token) or 'user' (whatever the user holds). */
  invalidated(userId, scope) {
    if (invalidateChannel.hasSubscribers) invalidateChannel.publish({ userId, scope })
  }

  // --- hooks: lib/lifecycle.js ---

  /**
   * A save of `userId`'s refreshed token to `options.store` failed (it is
   * kept and retried). Warns once per outage: `first` is the first failure
   * since saves last worked.
   */
  saveFailed(userId, cause, first) {
    if (saveFailedChannel.hasSubscribers) saveFailedChannel.publish({ userId, error: cause })
    if (first) {
      this.warn(
        'TTM_STORE_SAVE_FAILED',
        'tarabut-token-manager: options.store.save failed; refreshed tokens are kept in memory (and, with redis, sealed in Redis) and their saves retried with backoff',
      )
    }
  }

  // --- hooks: lib/coordination.js ---

  /**
   * Redis could not be used for `userId`: `phase` 'refresh' (the refresh ran
   * coordinated in-process only) or 'share' (its token could not be shared
   * with the other instances). `reason` says why, never with the URL.
   */
  redisFallback(userId, reason, phase) {
    this.#attach()
    if (redisFallbackChannel.hasSubscribers) redisFallbackChannel.publish({ userId, reason, phase })
  }

  // --- manager.metrics() ---

  /**
   * The manager's metrics in the Prometheus text exposition format. Refresh
   * counts go back to the manager's start; durations to the first call.
   */
  metrics() {
    try {
      this.#attach()
      this.#snapshot = this.#stats()
      if (this.#registry === null) {
        const made = promRegistry(this.#counts, () => this.#snapshot)
        this.#registry = made.registry
        this.#durations = made.durations
      }
      return this.#registry.metrics()
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /** OpenTelemetry's collection: this manager's stats, if it still reports to `meterProvider`. */
  statsFor(meterProvider) {
    if (meterProvider !== this.#meters || this.#instruments === null) return undefined
    try {
      return this.#stats()
    } catch (e) {
      this.#failed(e)
      return undefined
    }
  }

  /** `refresh` inside a span and the tracing channel's start, for whoever listens. */
  #traced(trace, detail, coordination, refresh) {
    let call = refresh
    try {
      const reason = refreshReason(detail.noToken, detail.expiresAtMs, this.#bufferMs, detail.nowMs)
      if (this.#tracer !== null) {
        const { api } = otel
        const attributes = this.#recordUserId
          ? { 'user.id': detail.userId, reason, refresher: trace.refresher, coordination }
          : { reason, refresher: trace.refresher, coordination }
        const span = this.#tracer.startSpan('tarabut_token_manager.refresh', { kind: api.SpanKind.INTERNAL, attributes })
        detail.span = span
        call = () => api.context.with(api.trace.setSpan(api.context.active(), span), refresh)
      }
      if (refreshChannel.hasSubscribers) call = this.#startChannel(detail, { userId: detail.userId, reason, refresher: trace.refresher, coordination }, call)
    } catch (e) {
      this.#failed(e)
    }
    return call
  }

  /**
   * The tracing channel's events as `tracePromise` publishes them, with the
   * refresh's own end: `start` (its stores active while the refresh function
   * runs) and `end` around the call; `error`, `asyncStart` and `asyncEnd` in
   * `#finish`, when its flight settles or times out (not when the refresh
   * function's promise does).
   */
  #startChannel(detail, ctx, refresh) {
    detail.channelContext = ctx
    return () => {
      try {
        return refreshChannel.start.runStores(ctx, refresh)
      } finally {
        refreshChannel.end.publish(ctx)
      }
    }
  }

  #finish(trace, error) {
    const outcome = error === undefined ? 'ok' : codeOf(error)
    const refresher = trace.refresher
    let byOutcome = this.#counts.get(refresher)
    if (byOutcome === undefined) this.#counts.set(refresher, (byOutcome = new Map()))
    byOutcome.set(outcome, (byOutcome.get(outcome) ?? 0) + 1)
    const ins = this.#instruments
    if (trace.startedAt === 0 && ins === null) return
    const durationMs = trace.startedAt === 0 ? 0 : performance.now() - trace.startedAt
    const detail = trace.detail
    try {
      const labels = { outcome, refresher }
      ins?.refreshes.add(1, labels)
      if (trace.startedAt !== 0) {
        ins?.['refresh.duration'].record(durationMs / 1000, labels)
        this.#durations?.observe(labels, durationMs / 1000)
      }
      const span = detail?.span ?? null
      if (span !== null) {
        span.setAttributes({ outcome, waiters: detail.waiters })
        if (error !== undefined) {
          span.setAttribute('error.type', outcome)
          span.setStatus({ code: otel.api.SpanStatusCode.ERROR, message: outcome })
        }
        span.end()
      }
    } catch (e) {
      this.#failed(e)
    }
    const ctx = detail?.channelContext ?? null
    if (ctx !== null) {
      ctx.waiters = detail.waiters
      ctx.durationMs = durationMs
      if (error !== undefined) {
        ctx.code = outcome
        ctx.error = error
        refreshChannel.error.publish(ctx)
      }
      refreshChannel.asyncStart.publish(ctx)
      refreshChannel.asyncEnd.publish(ctx)
    }
  }

  /**
   * Attaches to the OpenTelemetry providers passed in, else to the global
   * ones an SDK registered (none: nothing to record to). Runs on the slow
   * path only, so an SDK registered or replaced after the manager was made
   * is picked up at its next refresh.
   */
  #attach() {
    const option = this.#otelOption
    if (option === false) return
    const o = otelApi(option !== null)
    if (o === null) return
    try {
      const meters = option?.meterProvider ?? o.api.metrics.getMeterProvider()
      if (meters !== this.#meters) {
        this.#meters = meters
        this.#instruments?.observers.delete(this.#ref)
        this.#instruments = null
        if (option?.meterProvider != null || meters.getMeter(NAME, packageVersion()) !== o.api.createNoopMeter()) {
          const ins = instrumentsFor(meters)
          ins.observers.add(this.#ref)
          // Counted from the manager's start, as metrics() does.
          for (const [refresher, byOutcome] of this.#counts) for (const [outcome, n] of byOutcome) ins.refreshes.add(n, { outcome, refresher })
          this.#instruments = ins
        }
      }
      const tracers = option?.tracerProvider ?? o.api.trace.getTracerProvider().getDelegate()
      if (tracers !== this.#tracers) {
        this.#tracers = tracers
        this.#tracer = tracers === o.noTracers ? null : tracers.getTracer(NAME, packageVersion())
      }
    } catch (e) {
      this.#failed(e)
    }
  }

  /** Instrumentation must never break a refresh: report its own failure once. */
  #failed(e) {
    if (this.#reportedFailure) return
    this.#reportedFailure = true
    try {
      logWith(this.#logger, 'error', { code: 'TTM_OBSERVABILITY_FAILED' }, `tarabut-token-manager: recording metrics or traces failed (${e?.message ?? e}); refreshes are unaffected`)
    } catch {}
  }
}

module.exports = { Observer, checkOptions, REFRESHER_KIND, DURATION_BUCKETS }
