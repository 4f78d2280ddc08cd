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
 * round trip before it, one after, the second off the caller's path); a
 * token valid beyond the buffer never does. Needs Redis 6 or later (RESP3).
 *
 * At rest and on pub/sub, keys hold a SHA-256 of the user id and values are
 * AES-256-GCM sealed with `encryptionKey`; no token or user id appears in
 * clear. A cached token expires with the token, plus `idleTtlMs` so a
 * caller presenting an older token is still handed the newest one.
 *
 * `shouldUpdate` across instances: true for the caller whose call ran the
 * refresh, false for callers (in any instance) that waited on it, and true
 * for a later caller presenting an older token than the shared one (its copy
 * is stale: a lost write heals).
 */
export interface RedisOptions {
  /** `redis://[user:password@]host[:port][/db]` or `redis+unix:///path`. TLS (`rediss://`) is not supported by this build. */
  url: string
  /** Prefix of every key and of the pub/sub channel. Default `'ttm:'`. */
  keyPrefix?: string
  /**
   * The per-user lock's TTL in ms. Default 15000. The holder extends it while
   * its refresh runs (up to `refreshTimeoutMs`), so this bounds how long a
   * holder that died (killed mid-refresh) delays the other instances.
   */
  lockTtlMs?: number
  /**
   * Required: 32 random bytes, base64 (`openssl rand -base64 32`). Missing or
   * malformed: the constructor throws (`code: 'INVALID_ARGUMENT'`). A cached
   * value that does not decrypt (rotated key) is a cache miss, with one
   * `TTM_REDIS_UNDECRYPTABLE` process warning.
   */
  encryptionKey: string
  /**
   * Redis unreachable (or failing): `'local'` (default) coordinates refreshes
   * in-process only, emits one `TTM_REDIS_UNAVAILABLE` process warning per
   * outage and counts `stats().redisFallbacks`; `'fail'` rejects refreshes
   * with `code: 'COORDINATOR_UNAVAILABLE'` (a caller whose own token has not
   * expired yet still gets it back, as after any failed refresh). Either way
   * it reconnects in the background, and no call waits on Redis past
   * `refreshTimeoutMs`.
   */
  onError?: 'local' | 'fail'
}

export interface TokenManagerOptions {
  /** Refresh when fewer than this many ms remain. Default 300000 (5 min). */
  bufferTimeMs?: number
  /** No second refresh for a user within this many ms of the last one. Default 10000. */
  doubleCheckWindowMs?: number
  /** A refresh not settled by then rejects with `REFRESH_TIMEOUT` and its signal aborts. Default 30000. */
  refreshTimeoutMs?: number
  /** Per-user state with nothing in flight is dropped after this long unused. Default 600000 (10 min). */
  idleTtlMs?: number
  /** Coordinate refreshes across instances through Redis. Without it, coordination is in-process. */
  redis?: RedisOptions | null
}

export interface TokenManagerStats {
  /** Live per-user entries. */
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
   * (`redis.onError: 'local'`), including refreshed tokens that could not be
   * shared with the other instances. Always 0 without `redis`.
   */
  redisFallbacks: number
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
   * `idleTtlMs`; only this user's calls are looked up meanwhile.
   */
  invalidate(userId: string, accessToken?: string): void
  stats(): TokenManagerStats
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
  /** With `redis.onError: 'fail'`: Redis could not be used, so no refresh ran (also after `close()`). */
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
