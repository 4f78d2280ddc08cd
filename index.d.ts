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
  /** The newest refresh token known: one a previous refresh rotated in, else the caller's. */
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

export interface TokenManagerOptions {
  /** Refresh when fewer than this many ms remain. Default 300000 (5 min). */
  bufferTimeMs?: number
  /** No second refresh for a user within this many ms of the last one. Default 10000. */
  doubleCheckWindowMs?: number
  /** A refresh not settled by then rejects with `REFRESH_TIMEOUT` and its signal aborts. Default 30000. */
  refreshTimeoutMs?: number
  /** Per-user state with nothing in flight is dropped after this long unused. Default 600000 (10 min). */
  idleTtlMs?: number
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
}

export type TokenRefreshErrorCode =
  | 'REFRESH_FAILED'
  | 'REFRESH_TIMEOUT'
  | 'INVALID_REFRESH_RESULT'
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
