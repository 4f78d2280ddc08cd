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
   * `TypeError` (`code: 'INVALID_ARGUMENT'`), failed refreshes with a
   * `TokenRefreshError`.
   */
  getValidToken(userId: string, token: StoredToken, refreshFn: RefreshFn): Promise<ValidToken>
  /** The API answered 401 with this token (or, without one, with the user's token): the next call presenting it refreshes. */
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
  | 'COORDINATOR_UNAVAILABLE'
  | (string & {})

export declare class TokenRefreshError extends Error {
  readonly name: 'TokenRefreshError'
  code: TokenRefreshErrorCode
  userId: string
  cause?: unknown
}

/** The process-wide manager (one per JS realm: the main thread or a worker). */
export declare const tokenManager: TokenManager

/** `tokenManager.getValidToken`: the same singleton. */
export declare function getValidToken(userId: string, token: StoredToken, refreshFn: RefreshFn): Promise<ValidToken>
