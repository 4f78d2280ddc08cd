/** `Date`, epoch milliseconds (`number`) or an ISO 8601 date-time with a zone (`string`). */
export type TimeInput = Date | number | string

/**
 * The token as the caller stores it. On a user's first call, with nothing
 * stored yet, pass `{ accessToken: '', expiresAt: 0 }`: an empty token is
 * always refreshed.
 */
export interface StoredToken {
  /** The access token; `''` for none yet. */
  accessToken: string
  /** The refresh token, if the provider issued one (OAuth2). */
  refreshToken?: string | null
  /**
   * When the access token expires: a `Date`, epoch **milliseconds**, or an
   * ISO 8601 string with a zone. A number from 1e9 to 1e11 (epoch seconds)
   * is refused with a `TypeError` saying so.
   */
  expiresAt: TimeInput
}

/** What a refresh function receives. */
export interface RefreshContext {
  /** The user whose token is refreshed. */
  userId: string
  /** The newest refresh token known: one a previous refresh rotated in (with `redis`: in any instance), else the caller's. */
  refreshToken: string | null
  /** Aborted when the refresh times out (`refreshTimeoutMs`). An own property: `{ ...ctx }` keeps it. */
  signal: AbortSignal
}

/** What a refresh function returns: an expiry as `expiresAt` or `expiresIn` seconds. */
export interface RefreshedToken {
  /** The new access token (camelCase: map a provider's `access_token`). */
  accessToken: string
  /** A new (rotated) refresh token, if the provider sent one; else the old one is kept. */
  refreshToken?: string | null
  /** When it expires: a `Date`, epoch milliseconds or an ISO 8601 string. */
  expiresAt?: TimeInput
  /** Seconds from now. */
  expiresIn?: number
}

/**
 * Your refresh: called once per due token however many callers wait, with
 * the newest refresh token known. Throw a {@link TokenRefreshError} to give
 * callers a code of your choosing; anything else thrown is `REFRESH_FAILED`.
 */
export type RefreshFn = (ctx: RefreshContext) => Promise<RefreshedToken> | RefreshedToken

/** A token valid beyond the buffer. */
export interface ValidToken {
  /** Valid for at least `bufferTimeMs` more. */
  accessToken: string
  /** True for exactly one caller per refresh (and for callers whose copy is stale): persist this token. */
  shouldUpdate: boolean
  /** When `accessToken` expires. */
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
 * At rest and on pub/sub, keys name a user by an HMAC of the user id under
 * `userIdKey` (without it, a plain SHA-256, with one
 * `TTM_REDIS_UNKEYED_USER_IDS` warning) and values are
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
        /** Give `url` or `cluster`, not both. */
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
        /** Give `url` or `cluster`, not both. */
        url?: undefined
      }
  )

/** The options of {@link RedisOptions} that do not say where Redis is. */
export interface RedisCommonOptions {
  /**
   * For `rediss://`. The server's certificate is verified against the
   * system's roots, or against `ca` (PEM: one or more certificates) when
   * given, which then replaces them, as Node's `tls.connect({ ca })` does.
   * There is no switch to skip verification. A certificate that does not
   * verify fails like an outage (see `onError`), with a message saying so.
   */
  tls?: RedisTlsOptions | null
  /** Prefix of every key and of the pub/sub channel, at most 128 bytes. Default `'ttm:'`. */
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
   * 32 random bytes, base64 (`openssl rand -base64 32`), the same on every
   * instance: Redis key names and channel messages name each user by an
   * HMAC-SHA256 of the user id under it, so someone reading Redis cannot
   * check a guessed id (an email, a phone number) against them. A separate
   * secret from `encryptionKey` (one of those is refused), kept as it is
   * across key rotations: instances naming a user differently would lock
   * different keys and both refresh. Malformed or all zero bytes: the
   * constructor throws (`code: 'INVALID_ARGUMENT'`). Without it users are
   * named by a plain SHA-256 (as earlier releases do), with one
   * `TTM_REDIS_UNKEYED_USER_IDS` warning per process. Adding it to a
   * running fleet takes two rolling deploys, the first with `upgrading`
   * (docs/redis.md: Adding userIdKey to a running fleet).
   */
  userIdKey?: string
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
   * Set while instances of an earlier setup share this Redis (a rolling
   * upgrade): release 0.1, or (with `userIdKey`) instances without
   * `userIdKey`. Records are written so that 0.1 can open them (bound to
   * the user only, not to their fence, write time and expiry), and both
   * kinds are read. With `userIdKey`, each refresh also takes the user's
   * lock under the unkeyed name first (the one those instances take), reads
   * and writes the record under both names and announces under both, so
   * no two instances ever refresh one user. Remove it once none is left
   * (docs/redis.md, docs/trust-model.md: Upgrading). Default false.
   */
  upgrading?: boolean
}

/** TLS to Redis (`rediss://`): whom to trust. */
export interface RedisTlsOptions {
  /**
   * PEM certificates to trust instead of the system's roots: a private CA,
   * or (with `url`) the server's own self-signed certificate, which is then
   * accepted as it is (pinned; still checked for its dates and host name),
   * as `openssl req -x509` makes it (`CA:TRUE`) or not.
   */
  ca?: string | Uint8Array
}

/**
 * What `new TokenManager(options)` takes; every option has a default.
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
   * `TTM_REDIS_UNKEYED_USER_IDS`, `TTM_OBSERVABILITY_FAILED`): called as `logger.warn({ code }, message)`,
   * so a pino logger or `console` fits. Default: process warnings
   * (`process.emitWarning(message, { code })`).
   */
  logger?: TokenManagerLogger | null
  /**
   * OpenTelemetry metrics and spans (docs/observability.md). Default: the
   * global providers of `@opentelemetry/api` (an optional peer dependency),
   * no-ops until the application registers an SDK. Pass providers to use
   * those instead, or `false` to leave OpenTelemetry alone.
   */
  openTelemetry?: false | OpenTelemetryProviders | null
  /**
   * The app's own storage of each user's token (its database), for
   * `getToken`, `fetch`, `forget` and `revoke`: the manager loads the row,
   * and saves every token it refreshes before anyone is handed it.
   */
  store?: TokenStore | null
  /** The refresh `getToken` and `fetch` use: a refresh function or a native refresher (`oauth2Refresher`, `tarabutRefresher`). */
  refresher?: RefreshFn | NativeRefreshFn | null
  /**
   * Refresh users who called `getToken` or `fetch` within `activeWindowMs`
   * (default: `idleTtlMs`) before their token enters its buffer, at a
   * random moment in the last 20% of its fresh period (ending 5% before the
   * buffer), so no request waits on a refresh. Default: on when `store` and
   * `refresher` are set. Idle users are not refreshed.
   */
  refreshAhead?:
    | boolean
    | {
        /** Users who called within this many ms are refreshed ahead. Default `idleTtlMs`. */
        activeWindowMs?: number
      }
    | null
  /**
   * The `fetch` that `manager.fetch` sends with. Default: the global
   * `fetch`, looked up at each call; with a refresher that has a client
   * certificate (`tls.cert` and `tls.key`), undici's `fetch` over an undici
   * `Agent` presenting it. Given here with such a refresher, it receives
   * that Agent as `init.dispatcher` (undici 7).
   */
  fetch?: ((input: string | URL | Request, init?: RequestInit) => Promise<Response>) | null
}

/** A token as `store.save` receives it. */
export interface TokenToSave {
  /** The access token. */
  accessToken: string
  /** The refresh token to use next: the rotated one, or the one it was refreshed with. */
  refreshToken: string | null
  /** When the access token expires. */
  expiresAt: Date
}

/** The row as the manager last loaded or saved it: what `save` replaces. */
export interface PreviousToken {
  /** Its access token: a compare-and-set save matches the row on it. */
  accessToken: string
  /** Its expiry. */
  expiresAt: Date
}

/** The app's own storage of each user's token (its database). */
export interface TokenStore {
  /** The user's token, or null when there is none (never connected, or forgotten). */
  load(userId: string): Promise<StoredToken | null> | StoredToken | null
  /**
   * Persist a refreshed token in place of `previous` (the token as the
   * manager last loaded or saved it; null when none). Return `false` when
   * the row no longer holds `previous` (someone else wrote it): the manager
   * loads again and keeps whichever token expires later. Throw or reject
   * for a failed write: the token is kept (and served) and the save
   * retried with backoff, each failure reported (`stats().saveFailures`,
   * the `tarabut-token-manager:save-failed` channel, one
   * `TTM_STORE_SAVE_FAILED` warning per outage).
   */
  save(userId: string, token: TokenToSave, previous: PreviousToken | null): Promise<boolean | void> | boolean | void
  /** Drop the user's row (`forget`, `revoke`). */
  delete?(userId: string): Promise<void> | void
}

/** What `getToken` resolves with. */
export interface ManagedToken {
  /** Valid beyond the buffer: send it as `Authorization: Bearer`. */
  accessToken: string
  /** When it expires. */
  expiresAt: Date
}

/** pino, console, or anything with these two methods. */
export interface TokenManagerLogger {
  /** A warning: `fields.code` is stable (`TTM_REDIS_UNAVAILABLE`, ...). */
  warn(fields: { code: string }, message: string): void
  /** An error the manager recovered from; `fields.code` is stable. */
  error(fields: { code: string }, message: string): void
}

/** `@opentelemetry/api` providers (a `MeterProvider`, a `TracerProvider`). */
export interface OpenTelemetryProviders {
  /** Where metrics go. */
  meterProvider?: {
    /** `MeterProvider.getMeter`. */
    getMeter(name: string, version?: string, options?: object): unknown
  }
  /** Where spans go. */
  tracerProvider?: {
    /** `TracerProvider.getTracer`. */
    getTracer(name: string, version?: string, options?: object): unknown
  }
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
  /** The user refreshed. */
  userId: string
  /** Why it ran: the leader's token had expired, was inside the buffer, was invalidated, or was empty. */
  reason: 'expired' | 'buffer' | 'invalidated' | 'no-token'
  /** `tarabutRefresher`, `oauth2Refresher`, or any other function (including one wrapping those). */
  refresher: 'tarabut' | 'oauth2' | 'custom'
  /** How it was coordinated. */
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
  /** The user served. */
  userId: string
  /** What the refresh failed with. */
  code: TokenRefreshErrorCode
}

/**
 * `tarabut-token-manager:redis-fallback`: Redis could not be used. `phase`
 * 'refresh': the refresh ran coordinated in-process only; 'share': its token
 * could not be shared with the other instances. `reason` never holds the URL.
 */
export interface RedisFallbackMessage {
  /** The user whose refresh it was. */
  userId: string
  /** Why Redis could not be used, in words. */
  reason: string
  /** What went without Redis: the refresh itself, or sharing its token. */
  phase: 'refresh' | 'share'
}

/** `tarabut-token-manager:invalidate`: `invalidate(userId, token)` ('token') or `invalidate(userId)` ('user'). */
export interface InvalidateMessage {
  /** The user invalidated. */
  userId: string
  /** One token, or whatever the user holds. */
  scope: 'token' | 'user'
}

/** `manager.stats()`: counters kept as they change. */
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
  /** Refreshes ahead of need this process ran for active users (`store` and `refresher`); also counted in `refreshes`. */
  backgroundRefreshes: number
  /** Failed attempts to save a refreshed token to `store` (each retried). */
  saveFailures: number
  /** Refreshed tokens held until their save to `store` succeeds. */
  unsavedTokens: number
  /**
   * Messages on the Redis channel this manager dropped: not signed with any
   * of its `encryptionKey`s (forged, or an instance on another key: one
   * `TTM_REDIS_NOTICE_DROPPED` warning the first time this is read above
   * zero), sent over a minute ago, replayed, oversized or garbled. Always 0
   * without `redis`.
   */
  redisNoticesDropped: number
}

/**
 * Keeps per-user tokens valid: one refresh per user at a time, however many
 * callers (and, with `redis`, instances) ask together. The package exports a
 * process-wide one as {@link tokenManager}; make your own for other options.
 */
export declare class TokenManager {
  /** Throws a `TypeError` or `RangeError` (`code: 'INVALID_ARGUMENT'`) for bad options; never waits on Redis. */
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
  /**
   * A token valid beyond the buffer, loaded from `store` when this manager
   * holds none, refreshed and saved as needed. Needs `store` and
   * `refresher` (else rejects with a `TypeError`). A user without a row
   * rejects with `NOT_CONNECTED`; a `store.load` that fails, `STORE_FAILED`.
   */
  getToken(userId: string): Promise<ManagedToken>
  /**
   * `fetch` with `Authorization: Bearer <token>` (a request that sets its
   * own Authorization is sent as is). On a 401 the token is invalidated, in
   * every instance, and the request sent once more with a fresh token,
   * unless its body is a stream that cannot be sent again (then the 401 is
   * returned). Any other status is returned as is.
   *
   * Sender-constrained tokens follow the refresher (docs/fapi.md): with
   * `dpop`, `Authorization: DPoP <token>` and a fresh proof per request
   * (`htm`, `htu`, `ath`, the server's nonce; a `use_dpop_nonce` answer is
   * sent once more with the nonce it gave); with `tls.cert` and `tls.key`,
   * the connection presents that certificate (`ca`, if set, is trusted
   * instead of the built-in roots), and the answer is undici's `Response`.
   */
  fetch(userId: string, input: string | URL | Request, init?: RequestInit): Promise<Response>
  /**
   * Forgets the user: here, in Redis and (through it) in every instance,
   * and deletes their row (`store.delete`). Afterwards `getToken` rejects
   * with `NOT_CONNECTED` until the store holds a new row.
   */
  forget(userId: string): Promise<void>
  /**
   * RFC 7009: revokes the user's refresh token at the provider (a refresher
   * with a revocation endpoint: `oauth2Refresher` with `revocationUrl`,
   * else a `TypeError`), then `forget`s them. If the provider cannot be
   * reached the promise rejects and nothing is forgotten, so it can be tried again.
   */
  revoke(userId: string): Promise<void>
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

/** The stable codes of a {@link TokenRefreshError} (any other string is your own). */
export type TokenRefreshErrorCode =
  | 'REFRESH_FAILED'
  | 'REFRESH_TIMEOUT'
  | 'INVALID_REFRESH_RESULT'
  /** The provider answered `400 invalid_grant`: the user must reconnect (not retried). */
  | 'REAUTH_REQUIRED'
  /** `getToken`/`fetch`: the store holds no token for the user (never connected, or forgotten): they must connect their bank first. */
  | 'NOT_CONNECTED'
  /** `getToken`/`fetch`: `store.load` threw or rejected (`cause`). */
  | 'STORE_FAILED'
  /** The provider answered `401` or `invalid_client`: the client id or secret is wrong. */
  | 'INVALID_CLIENT'
  /** The provider's revocation endpoint (RFC 7009) did not answer 2xx, or no answer came in time. */
  | 'REVOKE_FAILED'
  /** With `redis`: Redis could not coordinate this refresh, so it did not run (see `RedisOptions.onError`; also after `close()`). */
  | 'COORDINATOR_UNAVAILABLE'
  | (string & {})

/** What a `TokenRefreshError` carries besides its code and message. */
export interface TokenRefreshErrorOptions {
  /** The user whose refresh failed. */
  userId?: string
  /** What caused it (the standard `Error` option). */
  cause?: unknown
  /** The token endpoint's HTTP status, when it answered. */
  status?: number
  /** The provider's `error` field (e.g. `'invalid_grant'`). */
  error?: string
}

/**
 * A refresh that did not produce a token. `code` is stable: switch on it.
 * A refresh function may throw one itself (say, `REAUTH_REQUIRED` when the
 * bank revoked the consent): callers then get it as thrown, code and all.
 */
export declare class TokenRefreshError extends Error {
  /**
   * `new TokenRefreshError('REAUTH_REQUIRED', 'the bank revoked the consent', { userId, cause })`.
   * The older `(code, userId, message, options?)` form still works at run
   * time (a string third argument says which), for code written against it.
   */
  constructor(code: TokenRefreshErrorCode, message?: string, options?: TokenRefreshErrorOptions)
  /** Always `'TokenRefreshError'`. */
  readonly name: 'TokenRefreshError'
  /** Stable: switch on it (the README's Errors table). */
  code: TokenRefreshErrorCode
  /** The user whose refresh failed (`''` when built without `userId`). */
  userId: string
  /** The token endpoint's HTTP status, when it answered (native refreshers). */
  status?: number
  /** The provider's `error` field (e.g. `'invalid_grant'`), when it sent one. */
  error?: string
  /** What caused it: what a refresh function threw, say. */
  cause?: unknown
}

/** What a native refresher needs from its caller; a `RefreshContext` fits. */
export interface RefresherContext {
  /** The user; Tarabut's `X-TG-CustomerUserId` (at most 40 characters). */
  userId: string
  /** Required by `oauth2Refresher`; ignored by `tarabutRefresher`. */
  refreshToken?: string | null
  /** Aborting it drops the HTTP request; the call rejects with `signal.reason`. */
  signal?: AbortSignal
}

/** The token a native refresher obtained. */
export interface RefresherToken {
  /** The new access token. */
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

/**
 * TLS to the token endpoint, as PEM text. Keys never leave Rust: parsed once
 * when the refresher is made (a bad one throws a `TypeError` naming the
 * option), redacted, wiped on drop, in no message.
 */
export interface RefresherTlsOptions {
  /**
   * The client certificate chain, leaf first, presented on the TLS
   * handshake (mutual TLS, RFC 8705); needs `key`.
   */
  cert?: string
  /** The private key of `cert`'s first certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM. */
  key?: string
  /**
   * The roots to trust instead of the built-in ones: one or more PEM
   * certificates, for a bank or sandbox behind a private CA.
   */
  ca?: string
}

/** What {@link tarabutRefresher} takes. Unknown keys are a `TypeError`. */
export interface TarabutRefresherOptions {
  /** Your Tarabut client id. */
  clientId: string
  /** Your Tarabut client secret: never in an error, a log or `Debug`. */
  clientSecret: string
  /** Default: Tarabut's sandbox token endpoint, `https://oauth.tarabutgateway.io/sandbox/token`. Set the production one here. https only (http for loopback hosts). */
  tokenUrl?: string
  /** Space-separated scopes, to narrow what the token may do. */
  scope?: string
  /** Budget of one refresh, all attempts, in ms; the manager's `refreshTimeoutMs` caps it. Default 30000. */
  timeoutMs?: number
  /** Retries of connection failures, 429 (after `Retry-After`) and 5xx, with jittered exponential backoff. 0 to 10, default 3. */
  maxRetries?: number
  /** A private CA (`ca`) and a client certificate (`cert` + `key`, mutual TLS). The refresher then has its own connection pool. */
  tls?: RefresherTlsOptions
}

/**
 * Tarabut Gateway's token call: `POST tokenUrl` with JSON
 * `{ clientId, clientSecret, grantType: 'client_credentials', scope? }` and
 * the header `X-TG-CustomerUserId: <userId>` (at most 40 characters,
 * printable ASCII). Throws a `TypeError` (`code: 'INVALID_ARGUMENT'`) for bad
 * or unknown options.
 */
export declare function tarabutRefresher(options: TarabutRefresherOptions): NativeRefreshFn

/** A private key: PKCS#8 PEM text (`-----BEGIN PRIVATE KEY-----`) or a private JWK (with `d`). */
export type PrivateKeyInput = string | JsonWebKey

/** What {@link oauth2Refresher} takes. Unknown keys are a `TypeError`. */
export interface OAuth2RefresherOptions {
  /** The token endpoint. https only (http for loopback hosts). */
  tokenUrl: string
  /** Your client id at the provider. */
  clientId: string
  /** Your client secret, for `client_secret_basic` and `client_secret_post` only (required by them, refused by the others); never in an error, a log or `Debug`. */
  clientSecret?: string
  /**
   * How the client authenticates. Default `'client_secret_basic'` (which
   * RFC 6749 requires servers to support). Open banking (FAPI) takes
   * `'private_key_jwt'` (RFC 7523: needs `privateKey`), `'tls_client_auth'`
   * or `'self_signed_tls_client_auth'` (RFC 8705: need `tls.cert` + `tls.key`).
   */
  authMethod?: 'client_secret_basic' | 'client_secret_post' | 'private_key_jwt' | 'tls_client_auth' | 'self_signed_tls_client_auth'
  /**
   * `private_key_jwt`: the client's signing key, RSA (2048 bits or more),
   * EC P-256 or Ed25519. Parsed once, here: a bad key, a public key or one
   * that does not fit `algorithm` throws a `TypeError` naming `privateKey`.
   * It never leaves Rust, is wiped on drop and appears in no message.
   */
  privateKey?: PrivateKeyInput
  /** `private_key_jwt`: the assertion's `kid` header; default the JWK's `kid`, if any. */
  keyId?: string
  /** `private_key_jwt`: default by key type: RSA → PS256, P-256 → ES256, Ed25519 → EdDSA. RS256 on request. */
  algorithm?: 'PS256' | 'ES256' | 'EdDSA' | 'RS256'
  /** `private_key_jwt`: the assertion's `aud`; default `tokenUrl` (FAPI 2.0 servers want their issuer identifier). */
  audience?: string
  /** Sent as `scope` with each refresh, to narrow it. */
  scope?: string
  /** Budget of one refresh (or revocation) in ms; the manager's `refreshTimeoutMs` caps it. Default 30000. */
  timeoutMs?: number
  /**
   * The provider's RFC 7009 revocation endpoint (its metadata's
   * `revocation_endpoint`), to revoke a user's refresh token on sign-out with
   * the same client authentication. https only (http for loopback hosts).
   */
  revocationUrl?: string
  /** A private CA (`ca`) and a client certificate (`cert` + `key`, mutual TLS), for the token and revocation endpoints. The refresher then has its own connection pool. */
  tls?: RefresherTlsOptions
  /**
   * DPoP (RFC 9449): every token request carries a fresh proof signed with
   * this key (`htm`, `htu`, `iat`, a random `jti`, the public JWK in its
   * header), so the tokens are bound to it. A `use_dpop_nonce` answer is
   * retried once with the server's nonce, which is kept for later requests
   * to that server. An answer whose `token_type` is not `DPoP` is an error
   * (`REFRESH_FAILED`), never a silent downgrade to Bearer.
   */
  dpop?: RefresherDpopOptions
}

/** `oauth2Refresher`'s `dpop`: the key every DPoP proof is signed with. */
export interface RefresherDpopOptions {
  /** The proof key: PKCS#8 PEM or a private JWK. Parsed once (a `TypeError` naming `dpop.privateKey` if bad), wiped on drop, in no message. */
  privateKey: PrivateKeyInput
  /** Default by key type: EC P-256 → ES256 (the usual choice), RSA → PS256, Ed25519 → EdDSA. */
  algorithm?: 'ES256' | 'PS256' | 'EdDSA'
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
