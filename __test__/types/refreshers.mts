// The native refreshers' types: accepted where a RefreshFn is, callable
// directly, typed errors with status and the provider's error field.
import {
  getValidToken,
  oauth2Refresher,
  tarabutRefresher,
  TokenManager,
  TokenRefreshError,
  type NativeRefreshFn,
  type RefreshFn,
  type RefresherToken,
} from 'tarabut-token-manager'

const tarabut: NativeRefreshFn = tarabutRefresher({ clientId: 'id', clientSecret: 'secret', scope: 'accounts', timeoutMs: 10_000, maxRetries: 3 })
const oauth2 = oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', clientSecret: 'secret', authMethod: 'client_secret_post' })

const v = await getValidToken('user-1', { accessToken: 'a', expiresAt: new Date() }, tarabut)
void v.shouldUpdate
await new TokenManager().getValidToken('user-1', { accessToken: 'a', refreshToken: 'rt', expiresAt: 0 }, oauth2)

// Wrapped by hand: still a RefreshFn.
const wrapped: RefreshFn = async (ctx) => {
  const t: RefresherToken = await oauth2(ctx)
  return t
}
void wrapped

const direct: RefresherToken = await tarabut({ userId: 'user-1', signal: AbortSignal.timeout(5_000) })
const seconds: number = direct.expiresIn
void seconds

try {
  await oauth2({ userId: 'user-1', refreshToken: 'rt' })
} catch (e) {
  if (e instanceof TokenRefreshError && e.code === 'REAUTH_REQUIRED') {
    const status: number | undefined = e.status
    const error: string | undefined = e.error
    void [status, error]
  }
}

// @ts-expect-error clientSecret is required
tarabutRefresher({ clientId: 'id' })
// @ts-expect-error not a method the refresher knows
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', clientSecret: 's', authMethod: 'client_secret_jwt' })
// Open banking: private_key_jwt with a PEM or a JWK, mutual TLS, revocation.
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', authMethod: 'private_key_jwt', privateKey: '-----BEGIN PRIVATE KEY-----', keyId: 'k', algorithm: 'PS256', audience: 'https://idp.example' })
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', authMethod: 'private_key_jwt', privateKey: { kty: 'EC', crv: 'P-256', d: 'x', x: 'x', y: 'y' } })
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', authMethod: 'tls_client_auth', tls: { cert: 'pem', key: 'pem', ca: 'pem' }, revocationUrl: 'https://idp.example/revoke' })
tarabutRefresher({ clientId: 'id', clientSecret: 's', tls: { ca: 'pem' } })
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', clientSecret: 's', dpop: { privateKey: 'pem', algorithm: 'ES256' } })
// @ts-expect-error a DPoP key is required
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', clientSecret: 's', dpop: {} })
// @ts-expect-error HS256 is not an algorithm for private_key_jwt
oauth2Refresher({ tokenUrl: 'https://idp.example/token', clientId: 'id', authMethod: 'private_key_jwt', privateKey: 'pem', algorithm: 'HS256' })
// @ts-expect-error tokenUrl is required for OAuth2
oauth2Refresher({ clientId: 'id', clientSecret: 's' })
