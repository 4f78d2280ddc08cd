// One token manager per server process, made on first use (not at import:
// `next build` loads route modules without the runtime env). It keeps each
// user's token: loads it from the SQLite table (`tokenStore`), refreshes it
// with Tarabut's token endpoint, saves every new token there before anyone
// uses it, and refreshes active users ahead of need. With REDIS_URL set,
// refreshes are coordinated across every instance that shares that Redis.
import { TokenManager, tarabutRefresher } from 'tarabut-token-manager'

import { tokenStore } from '@/lib/db'

function env(name: string): string {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set`)
  return value
}

let state: { apiUrl: string; manager: TokenManager } | undefined

export function tarabut() {
  state ??= {
    apiUrl: env('TARABUT_API_URL'),
    manager: new TokenManager({
      store: tokenStore,
      refresher: tarabutRefresher({
        clientId: env('TARABUT_CLIENT_ID'),
        clientSecret: env('TARABUT_CLIENT_SECRET'),
        tokenUrl: env('TARABUT_TOKEN_URL'),
      }),
      redis: process.env.REDIS_URL
        ? { url: process.env.REDIS_URL, encryptionKey: env('TOKEN_CACHE_KEY'), userIdKey: env('TOKEN_USER_ID_KEY') }
        : undefined,
    }),
  }
  return state
}
