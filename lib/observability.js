'use strict'
// What every refresh did, for the tools production teams already run
// (README: Observability). lib/manager.js and lib/coordination.js call the
// hooks of one Observer per manager; everything else lives here:
// - node:diagnostics_channel: a tracing channel around each refresh this
//   process runs, plain channels for stale serves, Redis fallbacks and
//   invalidations, each published only when it has subscribers;
// - OpenTelemetry through `@opentelemetry/api` (an optional peer
//   dependency): loaded only once the application has registered a global
//   provider (or passed its own), never at startup;
// - Prometheus text (`metrics()`) through prom-client's Registry and metric
//   classes, loaded at the first scrape;
// - the logger every warning goes through.
// Only the slow path comes here. The hot path (a token valid beyond the
// buffer) is untouched: its hits are read from the core's counter when
// metrics are collected. No message, metric or span holds a token, a
// secret or a Redis URL: they carry a user id, why, how and what came of it.

const dc = require('node:diagnostics_channel')
const { argError } = require('./errors.js')

const NAME = 'tarabut-token-manager'
const refreshChannel = dc.tracingChannel(`${NAME}:refresh`)
const staleServedChannel = dc.channel(`${NAME}:stale-served`)
const redisFallbackChannel = dc.channel(`${NAME}:redis-fallback`)
const invalidateChannel = dc.channel(`${NAME}:invalidate`)

/** Refresh duration buckets in seconds, for token calls: 5 ms to 30 s. */
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

/** Where a refresh function comes from: lib/refreshers.js marks its own. */
const REFRESHER_KIND = Symbol('tarabut-token-manager.refresherKind')

/** Warnings go where they always went: process warnings with a stable code. */
const processWarnings = {
  warn: (fields, message) => process.emitWarning(message, { code: fields.code }),
  error: (fields, message) => process.emitWarning(message, { code: fields.code }),
}


/** `options.logger` and `options.openTelemetry`: TypeError on a bad one. */
function checkOptions(o) {
  const logger = o.logger
  if (logger !== undefined && logger !== null) {
    if (typeof logger !== 'object' && typeof logger !== 'function') {
      throw argError('options.logger', 'must be an object with warn and error methods (console and pino loggers fit)')
    }
    for (const m of ['warn', 'error']) {
      if (typeof logger[m] !== 'function') throw argError(`options.logger.${m}`, 'must be a function')
    }
  }
  const otel = o.openTelemetry
  if (otel === undefined || otel === null || otel === false) return
  if (typeof otel !== 'object') throw argError('options.openTelemetry', 'must be false or an object { meterProvider?, tracerProvider? }')
  if (otel.meterProvider != null && typeof otel.meterProvider.getMeter !== 'function') {
    throw argError('options.openTelemetry.meterProvider', 'must be a MeterProvider (with getMeter)')
  }
  if (otel.tracerProvider != null && typeof otel.tracerProvider.getTracer !== 'function') {
    throw argError('options.openTelemetry.tracerProvider', 'must be a TracerProvider (with getTracer)')
  }
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

/** @opentelemetry/api keeps its globals here (any copy of major version 1). */
const OTEL_GLOBAL = Symbol.for('opentelemetry.js.api.1')
/** The API module: undefined until wanted, null if it is not installed. */
let otelApi
function loadOtelApi() {
  if (otelApi === undefined) {
    try {
      otelApi = require('@opentelemetry/api')
    } catch {
      otelApi = null
    }
  }
  return otelApi
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
  /** WeakRefs to the Observers reporting here: a dropped manager is not kept alive. */
  const observers = new Set()
  ins = {
    observers,
    refreshes: meter.createCounter('tarabut_token_manager.refreshes', {
      description: 'Refreshes this process ran, by outcome (ok or the error code) and refresher',
      unit: '{refresh}',
    }),
    duration: meter.createHistogram('tarabut_token_manager.refresh.duration', {
      description: 'Duration of the refreshes this process ran, by outcome and refresher',
      unit: 's',
      advice: { explicitBucketBoundaries: DURATION_BUCKETS },
    }),
  }
  const observed = {
    users: meter.createObservableGauge('tarabut_token_manager.users', { description: 'Users the token manager holds state for', unit: '{user}' }),
    inFlight: meter.createObservableGauge('tarabut_token_manager.in_flight', { description: 'Refreshes running now', unit: '{refresh}' }),
    hits: meter.createObservableCounter('tarabut_token_manager.hits', { description: 'Calls answered without a refresh', unit: '{call}' }),
    coalesced: meter.createObservableCounter('tarabut_token_manager.coalesced', {
      description: "Calls that waited on another call's refresh",
      unit: '{call}',
    }),
    staleServed: meter.createObservableCounter('tarabut_token_manager.stale_served', {
      description: "Calls served their own still-valid token after a refresh failed",
      unit: '{call}',
    }),
    redisFallbacks: meter.createObservableCounter('tarabut_token_manager.redis.fallbacks', {
      description: 'Refreshes coordinated in-process only because Redis was unavailable',
      unit: '{refresh}',
    }),
  }
  const keys = Object.keys(observed)
  meter.addBatchObservableCallback((result) => {
    const sum = { users: 0, inFlight: 0, hits: 0, coalesced: 0, staleServed: 0, redisFallbacks: 0 }
    for (const ref of observers) {
      const o = ref.deref()
      const s = o === undefined ? undefined : o.statsFor(meterProvider)
      if (s === undefined) {
        observers.delete(ref)
        continue
      }
      for (const k of keys) sum[k] += s[k]
    }
    for (const k of keys) result.observe(observed[k], sum[k])
  }, Object.values(observed))
  instrumentsByProvider.set(meterProvider, ins)
  return ins
}

// --- Prometheus -------------------------------------------------------------

/**
 * Refresh outcomes and durations for `metrics()`, counted as they happen at
 * a few nanoseconds each (a prom-client observation costs about a
 * microsecond, and prom-client need not be loaded until someone scrapes).
 */
class RefreshTally {
  /** refresher -> outcome -> { count, sum, buckets } (buckets[i]: durations in (bound i-1, bound i]; the last: above 30 s). */
  #byRefresher = new Map()

  record(refresher, outcome, seconds) {
    let byOutcome = this.#byRefresher.get(refresher)
    if (byOutcome === undefined) this.#byRefresher.set(refresher, (byOutcome = new Map()))
    let s = byOutcome.get(outcome)
    if (s === undefined) byOutcome.set(outcome, (s = { count: 0, sum: 0, buckets: new Float64Array(DURATION_BUCKETS.length + 1) }))
    s.count++
    s.sum += seconds
    let i = 0
    while (i < DURATION_BUCKETS.length && seconds > DURATION_BUCKETS[i]) i++
    s.buckets[i]++
  }

  /** Every series: { labels: { outcome, refresher }, count, sum, buckets }. */
  *series() {
    for (const [refresher, byOutcome] of this.#byRefresher) {
      for (const [outcome, s] of byOutcome) yield { labels: { outcome, refresher }, ...s }
    }
  }
}

/**
 * A manager's prom-client Registry over its tally and `snapshot()` (its
 * stats() at scrape time). Loads prom-client's Registry and metric classes,
 * not its index, which also loads its default process metrics and
 * @opentelemetry/api.
 */
function promRegistry(tally, snapshot) {
  const Registry = require('prom-client/lib/registry')
  const Counter = require('prom-client/lib/counter')
  const Gauge = require('prom-client/lib/gauge')
  const registers = [new Registry()]
  new Counter({
    name: 'tarabut_token_manager_refreshes_total',
    help: 'Refreshes this process ran, by outcome (ok or the error code) and refresher.',
    labelNames: ['outcome', 'refresher'],
    registers,
    collect() {
      this.reset()
      for (const s of tally.series()) this.inc(s.labels, s.count)
    },
  })
  // prom-client's Histogram takes observations one by one; this one is
  // read from the tally. The Registry formats it like any other metric
  // (what it reads: name, help, type, aggregator and get()'s values).
  const name = 'tarabut_token_manager_refresh_duration_seconds'
  const help = 'Duration of the refreshes this process ran, by outcome and refresher.'
  registers[0].registerMetric({
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    async get() {
      const values = []
      for (const s of tally.series()) {
        let cumulative = 0
        DURATION_BUCKETS.forEach((le, i) => {
          cumulative += s.buckets[i]
          values.push({ metricName: `${name}_bucket`, labels: { le, ...s.labels }, value: cumulative })
        })
        values.push({ metricName: `${name}_bucket`, labels: { le: '+Inf', ...s.labels }, value: s.count })
        values.push({ metricName: `${name}_sum`, labels: s.labels, value: s.sum })
        values.push({ metricName: `${name}_count`, labels: s.labels, value: s.count })
      }
      return { name, help, type: 'histogram', aggregator: 'sum', values }
    },
  })
  // The core's counters, the ones stats() reports.
  const gauge = (name, help, key) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(snapshot()[key])
      },
    })
  const counter = (name, help, key) =>
    new Counter({
      name,
      help,
      registers,
      collect() {
        this.reset()
        this.inc(snapshot()[key])
      },
    })
  gauge('tarabut_token_manager_users', 'Users the token manager holds state for.', 'users')
  gauge('tarabut_token_manager_in_flight', 'Refreshes running now.', 'inFlight')
  counter('tarabut_token_manager_hits_total', 'Calls answered without a refresh.', 'hits')
  counter('tarabut_token_manager_coalesced_total', "Calls that waited on another call's refresh.", 'coalesced')
  counter('tarabut_token_manager_stale_served_total', 'Calls served their own still-valid token after a refresh failed.', 'staleServed')
  counter('tarabut_token_manager_redis_fallbacks_total', 'Refreshes coordinated in-process only because Redis was unavailable.', 'redisFallbacks')
  return registers[0]
}

// --- One manager's observer -------------------------------------------------

/** One flight this manager leads: who asked, why, and (once it runs) its refresh. */
class RefreshTrace {
  constructor(flightId, userId, noToken, expiresAtMs, refresher, nowMs) {
    this.flightId = flightId
    this.userId = userId
    /** The leader's token and the caller's clock when it led, for `reason` (worked out only for whoever will see it). */
    this.noToken = noToken
    this.expiresAtMs = expiresAtMs
    this.nowMs = nowMs
    this.reason = null
    this.refresher = refresher
    /** Callers this flight serves: the leader's and every joiner's (counted when `tracked`). */
    this.waiters = 1
    this.tracked = false
    /** performance.now() when its refresh started; 0 while none ran. */
    this.startedAt = 0
    this.coordination = 'local'
    /** The flight settled (a refresh starting later ends on its own). */
    this.settled = false
    this.finished = false
    /** The tracing channel's context, when it had subscribers. */
    this.channelContext = null
    this.span = null
  }
}

class Observer {
  #logger
  /**
   * false: OpenTelemetry off; null: the global providers; else explicit ones.
   * @type {false | null | { meterProvider: any, tracerProvider: any }}
   */
  #otelOption
  #stats
  #bufferMs
  #flights = new Map()
  #tally = new RefreshTally()
  /** prom-client's Registry, from the first scrape on. */
  #registry = null
  #snapshot = null
  #reportedFailure = false
  // OpenTelemetry, once attached.
  #ref = new WeakRef(this)
  #meterProvider = null
  #instruments = null
  #tracer = null

  /**
   * @param options the manager's options (checked by `checkOptions`)
   * @param stats the manager's `stats()`
   * @param bufferMs the effective `bufferTimeMs`
   */
  constructor(options, stats, bufferMs) {
    this.#logger = options.logger ?? processWarnings
    const otel = options.openTelemetry
    this.#otelOption = otel === false ? false : otel == null ? null : { meterProvider: otel.meterProvider ?? null, tracerProvider: otel.tracerProvider ?? null }
    this.#stats = stats
    this.#bufferMs = bufferMs
    this.#attach()
  }

  /** A warning with a stable code, through the logger (pino's argument order). */
  warn(code, message) {
    try {
      this.#logger.warn({ code }, message)
    } catch {}
  }

  // --- hooks: lib/manager.js ---

  /** This manager leads flight `flightId`, decided at `nowMs` on the caller's clock (its refresh may run now, later or elsewhere). */
  lead(flightId, userId, accessToken, expiresAtMs, refreshFn, nowMs) {
    this.#attach()
    const trace = new RefreshTrace(flightId, userId, accessToken.length === 0, expiresAtMs, refreshFn[REFRESHER_KIND] ?? 'custom', nowMs)
    // Joiners are counted only for whoever will see `waiters` (a span, a
    // subscriber): most refreshes skip the bookkeeping.
    if (this.#tracer !== null || refreshChannel.hasSubscribers) {
      trace.tracked = true
      this.#flights.set(flightId, trace)
    }
    return trace
  }

  /** A caller joined flight `flightId`. */
  joined(flightId) {
    const trace = this.#flights.get(flightId)
    if (trace !== undefined) trace.waiters++
  }

  /**
   * Runs `refresh` (the refresh of `trace`'s flight) as traced: inside the
   * tracing channel's start and an OpenTelemetry span, both active while
   * `refresh` runs (so spans of a refresh function's own calls are children).
   */
  run(trace, coordination, refresh) {
    if (trace.startedAt !== 0) return refresh()
    trace.coordination = coordination
    trace.startedAt = performance.now()
    let traced = refresh
    try {
      if (this.#tracer !== null || refreshChannel.hasSubscribers) trace.reason = refreshReason(trace.noToken, trace.expiresAtMs, this.#bufferMs, trace.nowMs)
      if (this.#tracer !== null) traced = this.#startSpan(trace, refresh)
      if (refreshChannel.hasSubscribers) traced = this.#startChannel(trace, traced)
    } catch (e) {
      this.#failed(e)
    }
    const p = traced()
    // The flight already gave up (its timeout passed while waiting for
    // Redis): this refresh ends on its own.
    if (trace.settled) p.then(() => this.#finish(trace, undefined), (e) => this.#finish(trace, e))
    return p
  }

  /** Flight of `trace` settled: `error` or undefined. */
  settled(trace, error) {
    trace.settled = true
    if (trace.tracked) this.#flights.delete(trace.flightId)
    if (trace.startedAt !== 0) this.#finish(trace, error)
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

  /** The manager's metrics in the Prometheus text exposition format. */
  metrics() {
    try {
      this.#attach()
      this.#snapshot = this.#stats()
      this.#registry ??= promRegistry(this.#tally, () => this.#snapshot)
      return this.#registry.metrics()
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /** OpenTelemetry's collection: this manager's stats, if it still reports to `meterProvider`. */
  statsFor(meterProvider) {
    if (meterProvider !== this.#meterProvider) return undefined
    try {
      return this.#stats()
    } catch (e) {
      this.#failed(e)
      return undefined
    }
  }

  #startSpan(trace, refresh) {
    const api = otelApi
    const span = this.#tracer.startSpan('tarabut_token_manager.refresh', {
      kind: api.SpanKind.INTERNAL,
      attributes: { 'user.id': trace.userId, reason: trace.reason, refresher: trace.refresher, coordination: trace.coordination },
    })
    trace.span = span
    return () => api.context.with(api.trace.setSpan(api.context.active(), span), refresh)
  }

  /**
   * The tracing channel's events as `tracePromise` publishes them, with the
   * refresh's own end: `start` (its stores active while the refresh function
   * runs) and `end` around the call; `error`, `asyncStart` and `asyncEnd` in
   * `#finish`, when its flight settles or times out (not when the refresh
   * function's promise does).
   */
  #startChannel(trace, refresh) {
    const ctx = { userId: trace.userId, reason: trace.reason, refresher: trace.refresher, coordination: trace.coordination }
    trace.channelContext = ctx
    return () => {
      try {
        return refreshChannel.start.runStores(ctx, refresh)
      } finally {
        refreshChannel.end.publish(ctx)
      }
    }
  }


  #finish(trace, error) {
    if (trace.finished) return
    trace.finished = true
    const durationMs = performance.now() - trace.startedAt
    const outcome = error === undefined ? 'ok' : codeOf(error)
    try {
      this.#tally.record(trace.refresher, outcome, durationMs / 1000)
      const ins = this.#instruments
      if (ins !== null) {
        const attributes = { outcome, refresher: trace.refresher }
        ins.refreshes.add(1, attributes)
        ins.duration.record(durationMs / 1000, attributes)
      }
      const span = trace.span
      if (span !== null) {
        span.setAttributes({ outcome, waiters: trace.waiters })
        if (error !== undefined) {
          span.setAttribute('error.type', outcome)
          span.setStatus({ code: otelApi.SpanStatusCode.ERROR, message: outcome })
        }
        span.end()
      }
    } catch (e) {
      this.#failed(e)
    }
    const ctx = trace.channelContext
    if (ctx !== null) {
      ctx.waiters = trace.waiters
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
   * Attaches to OpenTelemetry when there is something to attach to: the
   * providers passed in, or global ones some copy of the API registered.
   * Before that the API is not even loaded. Runs on the slow path only, so
   * an SDK registered after the manager was made is picked up.
   */
  #attach() {
    const option = this.#otelOption
    if (option === false) return
    if (option === null && globalThis[OTEL_GLOBAL] === undefined && this.#meterProvider === null) return
    try {
      const api = loadOtelApi()
      if (api === null) return
      const meterProvider = option?.meterProvider ?? api.metrics.getMeterProvider()
      if (meterProvider !== this.#meterProvider) {
        if (this.#instruments !== null) this.#instruments.observers.delete(this.#ref)
        this.#instruments = instrumentsFor(meterProvider)
        this.#instruments.observers.add(this.#ref)
        this.#meterProvider = meterProvider
      }
      // The global tracer provider is a proxy: a tracer from it follows a
      // later registration.
      this.#tracer ??= (option?.tracerProvider ?? api.trace.getTracerProvider()).getTracer(NAME, packageVersion())
    } catch (e) {
      this.#failed(e)
    }
  }

  /** Instrumentation must never break a refresh: report its own failure once. */
  #failed(e) {
    if (this.#reportedFailure) return
    this.#reportedFailure = true
    try {
      this.#logger.error({ code: 'TTM_OBSERVABILITY_FAILED' }, `tarabut-token-manager: recording metrics or traces failed (${e?.message ?? e}); refreshes are unaffected`)
    } catch {}
  }
}

module.exports = { Observer, checkOptions, REFRESHER_KIND, DURATION_BUCKETS }
