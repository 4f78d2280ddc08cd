// Compiled by `tsc -p __test__/types` in `npm test`: the public types accept
// the call sites the seed module's users wrote, and reject misuse.
import {
  getValidToken,
  tokenManager,
  TokenManager,
  TokenRefreshError,
  type RefreshFn,
  type StoredToken,
  type ValidToken,
  type TokenManagerStats,
} from 'tarabut-token-manager'

declare const row: { accessToken: string; refreshToken: string | null; expiresAt: Date }
declare function persist(t: { accessToken: string; expiresAt: Date; refreshToken?: string | null }): Promise<void>

const refresh: RefreshFn = async ({ userId, refreshToken, signal }) => {
  const res = await fetch('https://example.invalid/token', { method: 'POST', signal, body: `${userId}:${refreshToken ?? ''}` })
  const body = (await res.json()) as { accessToken: string; expiresIn: number }
  return { accessToken: body.accessToken, expiresIn: body.expiresIn }
}

// The seed's call site, unchanged.
const { accessToken, shouldUpdate, expiresAt }: ValidToken = await tokenManager.getValidToken('user-1', row, refresh)
if (shouldUpdate) await persist({ accessToken, expiresAt })

const stored: StoredToken = { accessToken: 'a', expiresAt: '2026-01-25T21:14:28Z' }
const viaFunction: Promise<ValidToken> = getValidToken('user-1', stored, () => ({ accessToken: 'b', expiresAt: Date.now() + 60_000 }))
void viaFunction

const custom = new TokenManager({ bufferTimeMs: 60_000, doubleCheckWindowMs: 5_000, refreshTimeoutMs: 10_000, idleTtlMs: 600_000 })
custom.invalidate('user-1', accessToken)
custom.invalidate('user-1')
const s: TokenManagerStats = custom.stats()
const n: number = s.users + s.inFlight + s.hits + s.refreshes + s.coalesced + s.failures + s.timeouts + s.staleServed
void n

try {
  await custom.getValidToken('user-1', row, refresh)
} catch (e) {
  if (e instanceof TokenRefreshError) {
    const code: string = e.code
    const user: string = e.userId
    void [code, user, e.cause]
  }
}

// @ts-expect-error the refresh function must return a token
custom.getValidToken('u', row, async () => 42)
// @ts-expect-error expiresAt is required
custom.getValidToken('u', { accessToken: 'a' }, refresh)
// @ts-expect-error options are numbers
new TokenManager({ bufferTimeMs: '5m' })

// Another clock (the default is Date.now, read at each call).
const clocked = new TokenManager({ now: () => performance.timeOrigin + performance.now() })
void new TokenManager({ now: Date.now })
void clocked
// @ts-expect-error now is a function returning epoch ms
new TokenManager({ now: new Date() })
// @ts-expect-error now returns a number
new TokenManager({ now: () => new Date() })

// Cross-instance coordination on Redis.
const shared = new TokenManager({
  redis: { url: 'redis://127.0.0.1:6379', encryptionKey: 'base64-32-bytes', keyPrefix: 'app:', lockTtlMs: 15_000, onError: 'fail' },
})
const fallbacks: number = shared.stats().redisFallbacks
void fallbacks
const closing: Promise<void> = shared.close()
void closing
const unavailable: TokenRefreshError['code'] = 'COORDINATOR_UNAVAILABLE'
void unavailable
// @ts-expect-error encryptionKey is required with redis
new TokenManager({ redis: { url: 'redis://127.0.0.1:6379' } })
// TLS with a private CA, a cluster, and a key rotation.
new TokenManager({ redis: { url: 'rediss://ttm:pw@redis.internal:6380', tls: { ca: '-----BEGIN CERTIFICATE-----' }, encryptionKey: 'k' } })
new TokenManager({ redis: { cluster: ['redis://10.0.0.1:6379', 'redis://10.0.0.2:6379'], tls: { ca: new Uint8Array() }, encryptionKey: ['new', 'old'] } })
// @ts-expect-error url or cluster, not both
new TokenManager({ redis: { url: 'redis://h', cluster: ['redis://h'], encryptionKey: 'k' } })
// @ts-expect-error one of url and cluster is required
new TokenManager({ redis: { encryptionKey: 'k' } })
// @ts-expect-error a rotation needs at least one key
new TokenManager({ redis: { url: 'redis://h', encryptionKey: [] } })
// @ts-expect-error there is no switch to skip certificate checks
new TokenManager({ redis: { url: 'rediss://h', tls: { insecureSkipVerify: true }, encryptionKey: 'k' } })
for (const onError of ['auto', 'local', 'fail'] as const) new TokenManager({ redis: { url: 'redis://h', encryptionKey: 'k', onError } })
// @ts-expect-error onError is 'auto', 'local' or 'fail'
new TokenManager({ redis: { url: 'redis://h', encryptionKey: 'k', onError: 'retry' } })
