// TokenRefreshError as a refresh function builds it (`tsc -p __test__/types`).
import { TokenRefreshError, type RefreshFn, type TokenRefreshErrorOptions } from 'tarabut-token-manager'

const reconnect: RefreshFn = async ({ userId, refreshToken }) => {
  if (refreshToken === null) throw new TokenRefreshError('REAUTH_REQUIRED', 'no refresh token: reconnect the bank', { userId })
  const res = await fetch('https://example.invalid/token', { method: 'POST', body: refreshToken })
  if (res.status === 400) throw new TokenRefreshError('REAUTH_REQUIRED', 'the bank revoked the consent', { userId, status: 400, error: 'invalid_grant' })
  if (!res.ok) throw new TokenRefreshError('REFRESH_FAILED', `token endpoint answered ${res.status}`, { userId, status: res.status, cause: res })
  return { accessToken: 'a', expiresIn: 3600 }
}
void reconnect

const options: TokenRefreshErrorOptions = { userId: 'u', cause: new Error('x') }
const e = new TokenRefreshError('REFRESH_FAILED', 'failed', options)
const code: string = e.code
const user: string = e.userId
const status: number | undefined = e.status
void [code, user, status, new TokenRefreshError('REFRESH_TIMEOUT'), new TokenRefreshError('MY_OWN_CODE', 'an app code is a string too')]

// @ts-expect-error a code is required
new TokenRefreshError()
// @ts-expect-error options are an object
new TokenRefreshError('REFRESH_FAILED', 'm', 'u')
// @ts-expect-error status is a number
new TokenRefreshError('REFRESH_FAILED', 'm', { status: '400' })
