/** `Date`, epoch milliseconds (`number`) or an ISO 8601 date-time with a zone (`string`). */
export type TimeInput = Date | number | string

/** The token as the caller stores it. */
export interface StoredToken {
  accessToken: string
  refreshToken?: string | null
  expiresAt: TimeInput
}

/** What a refresh function receives. */
export interface RefreshContext {
  userId: string
  /** The newest refresh token known: one a previous refresh rotated in (with `redis`: in any instance), else the caller's. */
  refreshToken: string | null
  /** Aborted when the refresh times out (`refreshTimeoutMs`). */
  signal: AbortSignal
}

/** What a refresh function returns: an expiry as `expiresAt` or `expiresIn` seconds. */
export interface RefreshedToken {
  accessToken: string
  refreshToken?: string | null
  expiresAt?: TimeInput
  /** Seconds from now. */
  expiresIn?: number
}

export type RefreshFn = (ctx: RefreshContext) => Promise<RefreshedToken> | RefreshedToken

/** A token valid beyond the buffer. */
export interface ValidToken {
  accessToken: string
  /** True for exactly one caller per refresh (and for callers whose copy is stale): persist this token. */
  shouldUpdate: boolean
  expiresAt: Date
  /** Present with `shouldUpdate` when a refresh returned (rotated) a refresh token: persist it too. */
  refreshToken?: string | null
}

/**
 * Cross-instance coordination on Redis: one refresh per user across every
 * process or pod sharing the Redis. Only a due refresh talks to Redis (one
 * round trip before it, one after, both on the caller's path); a
 * token valid beyond the buffer never does. Needs Redis 6 or later (RESP3).
 * One node (`url`) or a Redis Cluster (`cluster`), each over TCP or TLS
 * (`rediss://`).
 *
 * At rest and on pub/sub, keys hold a SHA-256 of the user id and values are
 * AES-256-GCM sealed with `encryptionKey`, bound to the record's user,
 * fence, write time and expiry; no token or user id appears in clear. Every
 * pub/sub notice is signed (an HMAC under a key derived from
 * `encryptionKey`): one that is not, or is stale or replayed, is dropped
 * (`stats().redisNoticesDropped`). A `redis://` URL (no TLS) to a host other
 * than this one gets one `TTM_REDIS_PLAINTEXT` warning. What Redis sees and
 * what someone with access to it can do: docs/trust-model.md. A cached token expires with the token, plus `idleTtlMs` so a
 * caller presenting an older token is still handed the newest one.
 *
 * `shouldUpdate` across instances: true for the caller whose call ran the
 * refresh, false for callers (in any instance) that waited on it, and true
 * for a later caller presenting an older token than the shared one (its copy
 * is stale: a lost write heals).
 */
export type RedisOptions = RedisCommonOptions &
  (
    | {
        /**
         * One node: `redis://[user:password@]host[:port][/db]` (`user` for a
         * Redis 6 ACL user; `redis://:password@host` for `requirepass`),
         * `rediss://...` for TLS, or `redis+unix:///path`. The password never
         * appears in an error, a warning or a log.
         */
        url: string
        cluster?: undefined
      }
    | {
        /**
         * A Redis Cluster: the URLs of some of its nodes (the client finds
         * the rest), sharing one user, password and scheme. Each user's keys
         * share one hash slot; redirections, slot migrations and failovers
         * are followed.
         */
        cluster: readonly string[]
        url?: undefined
      }
  )

export interface RedisCommonOptions {
  /**
   * For `rediss://`. The server's certificate is verified against the
   * system's roots, or against `ca` (PEM: one or more certificates) when
   * given, which then replaces them, as Node's `tls.connect({ ca })` does.
   * There is no switch to skip verification. A certificate that does not
   * verify fails like an outage (see `onError`), with a message saying so.
   */
  tls?: RedisTlsOptions | null
  /** Prefix of every key and of the pub/sub channel. Default `'ttm:'`. */
  keyPrefix?: string
  /**
   * The per-user lock's TTL in ms. Default 15000. The holder extends it while
   * its refresh runs (up to `refreshTimeoutMs`), so this bounds how long a
   * holder that died (killed mid-refresh) delays the other instances.
   */
  lockTtlMs?: number
  /**
   * Required: 32 random bytes, base64 (`openssl rand -base64 32`), or a
   * list of them for a rotation: the first seals and signs notices, every
   * one opens and verifies (at most 8). Missing, malformed, all zero bytes
   * or repeated in the list: the constructor throws (`code:
   * 'INVALID_ARGUMENT'`). A cached value that opens with none of them is a
   * cache miss, with one `TTM_REDIS_UNDECRYPTABLE` warning (`logger`; default: a process warning).
   */
  encryptionKey: string | readonly [string, ...string[]]
  /**
   * What happens to a refresh Redis cannot coordinate (Redis down, a call
   * unanswered for 1 s, or a restarted server whose locks may be lost):
   *
   * - `'auto'` (default): a refresh that would send a refresh token
   *   (`ctx.refreshToken` not null; `oauth2Refresher`) does not run: a
   *   caller whose own token has not expired gets it back (`shouldUpdate:
   *   false`, counted in `stats().staleServed`), others get
   *   `COORDINATOR_UNAVAILABLE`. After a restart or failover this lasts
   *   `refreshTimeoutMs` + 1.5 s, until every refresh the old server locked
   *   is over. Refreshes that send none (`tarabutRefresher`, client
   *   credentials) run with in-process coordination, counted in
   *   `stats().redisFallbacks`.
   * - `'local'`: every such refresh runs with in-process coordination. With
   *   rotating refresh tokens this can revoke grants (two instances send
   *   the same refresh token): only for refresh functions that send none.
   * - `'fail'`: none runs (`COORDINATOR_UNAVAILABLE`; an unexpired token is
   *   still served).
   *
   * Either way one `TTM_REDIS_UNAVAILABLE` warning (`logger`) is emitted per
   * outage, calls fail fast while Redis is down, and coordination resumes
   * within a second of Redis answering. No call waits on Redis past
   * `refreshTimeoutMs`.
   */
  onError?: 'auto' | 'local' | 'fail'
  /**
   * Set while instances of release 0.1 share this Redis (a rolling
   * upgrade): records are written so that they can open them (bound to the
   * user only, not to their fence, write time and expiry), and both kinds
   * are read. Remove it once none is left (docs/trust-model.md: Upgrading).
   * Default false.
   */
  upgrading?: boolean
}

export interface RedisTlsOptions {
  /** PEM certificates to trust instead of the system's roots (a private CA). */
  ca?: string | Uint8Array
}

/**
 * Every options object (the manager's, `redis`, `redis.tls`,
 * `openTelemetry`, the refreshers') is read from its own properties only,
 * each once: a property inherited from a prototype (a polluted
 * `Object.prototype`) is not an option, and an unknown key is a
 * `TypeError` (`code: 'INVALID_ARGUMENT'`) naming it, e.g.
 * `options.bufferTme`.
 */
export interface TokenManagerOptions {
  /** Refresh when fewer than this many ms remain. Default 300000 (5 min). */
  bufferTimeMs?: number
  /** No second refresh for a user within this many ms of the last one. Default 10000. */
  doubleCheckWindowMs?: number
  /** A refresh not settled by then rejects with `REFRESH_TIMEOUT` and its signal aborts. Default 30000. */
  refreshTimeoutMs?: number
  /**
   * Per-user state with nothing in flight is dropped after this long unused
   * (by a background task, within about a second, even with no calls).
   * Default 600000 (10 min).
   */
  idleTtlMs?: number
  /**
   * No token is taken to live longer than this many ms: a refresh result
   * whose expiry is later is capped to it (`expiresAt` says so, and a Redis
   * record expires by it), and a presented token expiring later than this
   * from now is refreshed. Guards against a provider answering
   * `expires_in: 1e10`. Must exceed `bufferTimeMs`. Default 2592000000 (30 days).
   */
  maxTokenLifetimeMs?: number
  /**
   * The clock every decision is made on, in epoch ms. Default `Date.now`,
   * looked up at each call, so fake timers (vitest, jest, sinon) move it.
   * Called with no arguments; one that throws or returns no epoch ms makes
   * the call reject with a `TypeError` or `RangeError`
   * (`code: 'INVALID_ARGUMENT'`) and leaves no state.
   */
  now?: () => number
  /** Coordinate refreshes across instances through Redis. Without it, coordination is in-process. */
  redis?: RedisOptions | null
  /**
   * Where warnings go (`TTM_REDIS_UNAVAILABLE`, `TTM_REDIS_UNDECRYPTABLE`,
   * `TTM_REDIS_NOTICE_DROPPED`, `TTM_REDIS_PLAINTEXT`,
   * `TTM_OBSERVABILITY_FAILED`): called as `logger.warn({ code }, message)`,
   * so a pino logger or `console` fits. Default: process warnings
   * (`process.emitWarning(message, { code })`).
   */
  logger?: TokenManagerLogger | null
  /**
   * OpenTelemetry metrics and spans (README: Observability). Default: the
   * global providers of `@opentelemetry/api` (an optional peer dependency),
   * no-ops until the application registers an SDK. Pass providers to use
   * those instead, or `false` to leave OpenTelemetry alone.
   */
  openTelemetry?: false | OpenTelemetryProviders | null
}

/** pino, console, or anything with these two methods. */
export interface TokenManagerLogger {
  warn(fields: { code: string }, message: string): void
  error(fields: { code: string }, message: string): void
}

/** `@opentelemetry/api` providers (a `MeterProvider`, a `TracerProvider`). */
export interface OpenTelemetryProviders {
  meterProvider?: { getMeter(name: string, version?: string, options?: object): unknown }
  tracerProvider?: { getTracer(name: string, version?: string, options?: object): unknown }
  /**
   * Put the user id on each refresh span as `user.id`. Default false:
   * spans are exported to other systems, so they carry no user id unless
   * asked (the in-process tracing channel always has it).
   */
  recordUserId?: boolean
}

/** How a refresh was coordinated: in-process, under the user's Redis lock, or in-process because Redis was unavailable. */
export type RefreshCoordination = 'local' | 'redis' | 'redis-fallback'

/**
 * The context of the `tarabut-token-manager:refresh` tracing channel
 * (`diagnostics_channel.tracingChannel`), one per refresh this process
 * runs: `start` and `end` around the call, then `asyncStart` and `asyncEnd`
 * (after `error` on failure) when the refresh is over.
 */
export interface RefreshChannelContext {
  userId: string
  /** Why it ran: the leader's token had expired, was inside the buffer, was invalidated, or was empty. */
  reason: 'expired' | 'buffer' | 'invalidated' | 'no-token'
  /** `tarabutRefresher`, `oauth2Refresher`, or any other function (including one wrapping those). */
  refresher: 'tarabut' | 'oauth2' | 'custom'
  coordination: RefreshCoordination
  /** When over: the callers this refresh served (its leader's and every caller that joined it here). */
  waiters?: number
  /** When over: from the refresh's start to its end (or its timeout). */
  durationMs?: number
  /** When it failed: the error code (as `error.code`). */
  code?: TokenRefreshErrorCode
  /** On failure (`error`, `asyncStart`, `asyncEnd`): what callers got. */
  error?: unknown
}

/** `tarabut-token-manager:stale-served`: a caller got its own still-valid token back after a refresh failed with `code`. */
export interface StaleServedMessage {
  userId: string
  code: TokenRefreshErrorCode
}

/**
 * `tarabut-token-manager:redis-fallback`: Redis could not be used. `phase`
 * 'refresh': the refresh ran coordinated in-process only; 'share': its token
 * could not be shared with the other instances. `reason` never holds the URL.
 */
export interface RedisFallbackMessage {
  userId: string
  reason: string
  phase: 'refresh' | 'share'
}

/** `tarabut-token-manager:invalidate`: `invalidate(userId, token)` ('token') or `invalidate(userId)` ('user'). */
export interface InvalidateMessage {
  userId: string
  scope: 'token' | 'user'
}

export interface TokenManagerStats {
  /** Live per-user entries (users seen within about `idleTtlMs`). */
  users: number
  /** Refreshes running now. */
  inFlight: number
  /** Calls answered without a refresh. */
  hits: number
  /** Successful refresh runs. */
  refreshes: number
  /** Calls that waited on another call's refresh. */
  coalesced: number
  /** Refreshes that rejected, threw or returned an invalid result. */
  failures: number
  /** Refreshes that did not settle within `refreshTimeoutMs`. */
  timeouts: number
  /** Still-valid tokens served after a failed refresh. */
  staleServed: number
  /**
   * Refreshes coordinated in-process only because Redis was unavailable
   * (with `redis.onError` `'auto'`: those that send no refresh token; with
   * `'local'`: all), including refreshed tokens that could not be shared
   * with the other instances at once. Always 0 without `redis`.
   */
  redisFallbacks: number
  /**
   * Messages on the Redis channel this manager dropped: not signed with any
   * of its `encryptionKey`s (forged, or an instance on another key: one
   * `TTM_REDIS_NOTICE_DROPPED` warning the first time this is read above
   * zero), sent over a minute ago, replayed, oversized or garbled. Always 0
   * without `redis`.
   */
  redisNoticesDropped: number
}

export declare class TokenManager {
  constructor(options?: TokenManagerOptions)
  /**
   * Resolves with a token valid beyond the buffer. Concurrent calls for one
   * user share one refresh. Never throws: bad arguments reject with a
   * `TypeError` (`code: 'INVALID_ARGUMENT'`: a `userId` over 512 bytes, a
   * token over 65536 bytes, an `expiresAt` no `Date` can hold, a getter
   * that throws), failed refreshes with a `TokenRefreshError`.
   */
  getValidToken(userId: string, token: StoredToken, refreshFn: RefreshFn): Promise<ValidToken>
  /**
   * The API answered 401 with this token (or, without one, with the user's
   * token): the next call presenting it refreshes. The mark lasts
   * `idleTtlMs`; only this user's calls are looked up meanwhile. With
   * `redis`, every instance sharing the Redis hears it too (pub/sub,
   * milliseconds), and the shared copy is marked so no instance hands it
   * out again, even one that was disconnected at the time.
   */
  invalidate(userId: string, accessToken?: string | null): void
  /** Counters kept as they change: constant time however many users are held. */
  stats(): TokenManagerStats
  /**
   * This manager's metrics in the Prometheus text exposition format
   * (`text/plain; version=0.0.4`): refreshes by outcome and refresher, their
   * durations (histogram, 5 ms to 30 s), users, in-flight refreshes, hits,
   * coalesced calls, stale serves and Redis fallbacks. Counts go back to the
   * manager's start; durations to the first `metrics()` call (or the first
   * subscriber or OpenTelemetry provider): a refresh nobody observes is not
   * timed.
   */
  metrics(): Promise<string>
  /**
   * With `redis`: waits for pending Redis writes, then closes the connection
   * so nothing lingers (an idle manager does not keep Node's event loop
   * alive either way). Later refreshes reject with
   * `COORDINATOR_UNAVAILABLE`; tokens valid beyond the buffer are still
   * served. Without `redis`: resolves at once.
   */
  close(): Promise<void>
}

export type TokenRefreshErrorCode =
  | 'REFRESH_FAILED'
  | 'REFRESH_TIMEOUT'
  | 'INVALID_REFRESH_RESULT'
  /** The provider answered `400 invalid_grant`: the user must reconnect (not retried). */
  | 'REAUTH_REQUIRED'
  /** The provider answered `401` or `invalid_client`: the client id or secret is wrong. */
  | 'INVALID_CLIENT'
  /** With `redis`: Redis could not coordinate this refresh, so it did not run (see `RedisOptions.onError`; also after `close()`). */
  | 'COORDINATOR_UNAVAILABLE'
  | (string & {})

export declare class TokenRefreshError extends Error {
  readonly name: 'TokenRefreshError'
  code: TokenRefreshErrorCode
  userId: string
  /** The token endpoint's HTTP status, when it answered (native refreshers). */
  status?: number
  /** The provider's `error` field (e.g. `'invalid_grant'`), when it sent one. */
  error?: string
  cause?: unknown
}

/** What a native refresher needs from its caller; a `RefreshContext` fits. */
export interface RefresherContext {
  userId: string
  /** Required by `oauth2Refresher`; ignored by `tarabutRefresher`. */
  refreshToken?: string | null
  /** Aborting it drops the HTTP request; the call rejects with `signal.reason`. */
  signal?: AbortSignal
}

/** The token a native refresher obtained. */
export interface RefresherToken {
  accessToken: string
  /** A rotated refresh token (OAuth2): persist it, the old one may be spent. */
  refreshToken?: string
  /** Seconds, as the provider said. */
  expiresIn: number
}

/**
 * A refresh function whose HTTP call runs in Rust. Pass it to
 * `getValidToken` in place of a `RefreshFn` (the manager then calls the
 * native half directly, with its `refreshTimeoutMs` as the budget), or call
 * it yourself. Failures reject with a `TokenRefreshError` whose `code` is
 * `REAUTH_REQUIRED`, `INVALID_CLIENT`, `REFRESH_FAILED` or `REFRESH_TIMEOUT`
 * (with `status` and `error` when the provider answered); no message holds a
 * token, a secret or a response body. A user id the provider cannot take
 * rejects with a `TypeError` (`code: 'INVALID_ARGUMENT'`) before any request.
 */
export interface NativeRefreshFn {
  (ctx: RefresherContext): Promise<RefresherToken>
}

export interface TarabutRefresherOptions {
  clientId: string
  clientSecret: string
  /** Default: Tarabut's sandbox token endpoint. Set the production one here. https only (http for loopback hosts). */
  tokenUrl?: string
  /** Space-separated scopes, to narrow what the token may do. */
  scope?: string
  /** Budget of one refresh, all attempts, in ms; the manager's `refreshTimeoutMs` caps it. Default 30000. */
  timeoutMs?: number
  /** Retries of connection failures, 429 (after `Retry-After`) and 5xx, with jittered exponential backoff. 0 to 10, default 3. */
  maxRetries?: number
}

/**
 * Tarabut Gateway's token call: `POST tokenUrl` with JSON
 * `{ clientId, clientSecret, grantType: 'client_credentials', scope? }` and
 * the header `X-TG-CustomerUserId: <userId>` (at most 40 characters,
 * printable ASCII). Throws a `TypeError` (`code: 'INVALID_ARGUMENT'`) for bad
 * or unknown options.
 */
export declare function tarabutRefresher(options: TarabutRefresherOptions): NativeRefreshFn

export interface OAuth2RefresherOptions {
  /** The token endpoint. https only (http for loopback hosts). */
  tokenUrl: string
  clientId: string
  clientSecret: string
  /** How the client authenticates. Default `'client_secret_basic'` (which RFC 6749 requires servers to support). */
  authMethod?: 'client_secret_basic' | 'client_secret_post'
  /** Sent as `scope` with each refresh, to narrow it. */
  scope?: string
  /** Budget of one refresh in ms; the manager's `refreshTimeoutMs` caps it. Default 30000. */
  timeoutMs?: number
}

/**
 * The RFC 6749 section 6 refresh: `grant_type=refresh_token` with
 * `ctx.refreshToken`. A rotated `refresh_token` comes back as
 * `refreshToken` (through `getValidToken`: with `shouldUpdate: true`), and
 * must be persisted. A request that may have reached the server is never
 * resent (with rotation that would revoke the grant). No refresh token, or
 * `400 invalid_grant`, rejects with `REAUTH_REQUIRED`. Without `expires_in`
 * in the answer the token is taken to live 3600 s.
 */
export declare function oauth2Refresher(options: OAuth2RefresherOptions): NativeRefreshFn

/** The process-wide manager (one per JS realm: the main thread or a worker). */
export declare const tokenManager: TokenManager

/** `tokenManager.getValidToken`: the same singleton. */
export declare function getValidToken(userId: string, token: StoredToken, refreshFn: RefreshFn): Promise<ValidToken>
