// A faithful port of the design this package replaces (the app's former
// lib/tarabut/token-manager.ts: a 5-minute proactive buffer, a per-user
// async-mutex, a 10 s double-check window, `{ accessToken, shouldUpdate,
// expiresAt }` with the caller persisting on shouldUpdate), kept only to
// measure against. Its flaws are deliberate: waiters behind the
// mutex get the caller's stale token back, both maps grow forever, a failing
// refresh runs once per waiter, and nothing times out.
import { Mutex } from 'async-mutex'

export interface SeedToken {
  accessToken: string
  refreshToken?: string | null
  expiresAt: Date
}

export interface SeedRefreshed {
  accessToken: string
  refreshToken?: string | null
  expiresAt: Date
}

export interface SeedValidToken {
  accessToken: string
  shouldUpdate: boolean
  expiresAt: Date
}

export interface SeedOptions {
  bufferTimeMs?: number
}

const DOUBLE_CHECK_WINDOW_MS = 10_000

export class SeedTokenManager {
  private readonly bufferTimeMs: number
  private readonly mutexes = new Map<string, Mutex>()
  private readonly lastRefreshTime = new Map<string, number>()

  constructor(options: SeedOptions = {}) {
    this.bufferTimeMs = options.bufferTimeMs ?? 5 * 60 * 1000
  }

  async getValidToken(
    userId: string,
    token: SeedToken,
    refreshFn: (refreshToken?: string | null) => Promise<SeedRefreshed>,
  ): Promise<SeedValidToken> {
    if (!this.isTokenExpiringSoon(token.expiresAt)) {
      return { accessToken: token.accessToken, shouldUpdate: false, expiresAt: token.expiresAt }
    }
    const mutex = this.getMutex(userId)
    return mutex.runExclusive(async () => {
      const last = this.lastRefreshTime.get(userId)
      if (last !== undefined && Date.now() - last < DOUBLE_CHECK_WINDOW_MS) {
        // The seed hands back the caller's own (stale) token here.
        return { accessToken: token.accessToken, shouldUpdate: false, expiresAt: token.expiresAt }
      }
      const refreshed = await refreshFn(token.refreshToken)
      this.lastRefreshTime.set(userId, Date.now())
      return { accessToken: refreshed.accessToken, shouldUpdate: true, expiresAt: refreshed.expiresAt }
    })
  }

  private isTokenExpiringSoon(expiresAt: Date): boolean {
    return expiresAt.getTime() - Date.now() < this.bufferTimeMs
  }

  private getMutex(userId: string): Mutex {
    let mutex = this.mutexes.get(userId)
    if (!mutex) {
      mutex = new Mutex()
      this.mutexes.set(userId, mutex)
    }
    return mutex
  }
}
