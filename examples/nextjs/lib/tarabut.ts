// One token manager and one refresher per server process, made on first use
// (not at import: `next build` loads route modules without the runtime env).
// With REDIS_URL set, refreshes are coordinated across every instance that
// shares that Redis.
import { TokenManager, tarabutRefresher, tokenManager } from 'tarabut-token-manager'

function env(name: string): string {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set`)
  return value
}

let state: { apiUrl: string; manager: TokenManager; refresher: ReturnType<typeof tarabutRefresher> } | undefined

export function tarabut() {
  state ??= {
    apiUrl: env('TARABUT_API_URL'),
    refresher: tarabutRefresher({
      clientId: env('TARABUT_CLIENT_ID'),
      clientSecret: env('TARABUT_CLIENT_SECRET'),
      tokenUrl: env('TARABUT_TOKEN_URL'),
    }),
    manager: process.env.REDIS_URL
      ? new TokenManager({ redis: { url: process.env.REDIS_URL, encryptionKey: env('TOKEN_CACHE_KEY') } })
      : tokenManager,
  }
  return state
}
