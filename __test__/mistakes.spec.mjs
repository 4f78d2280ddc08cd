// A new user's usual mistakes, each named for what it is the first time it
// happens: a wrong column type, epoch seconds where milliseconds belong, the
// provider's snake_case body returned as is, a duration given as a date,
// a context spread into a copy, an error built from the docs.
import { describe, expect, it, vi } from 'vitest'

import { TokenManager, TokenRefreshError } from '../index.mjs'

const HOUR = 3_600_000
let seq = 0
const uid = () => `user-${++seq}`
const fresh = () => ({ accessToken: 'a', expiresAt: Date.now() + HOUR })
const expired = () => ({ accessToken: 'old', refreshToken: 'rt', expiresAt: Date.now() - 1_000 })
const good = () => vi.fn(async () => ({ accessToken: `new-${++seq}`, expiresIn: 3600 }))
const failure = (promise) => promise.then(
  (v) => {
    throw new Error(`resolved: ${JSON.stringify(v)}`)
  },
  (e) => e,
)

describe('the presented token is checked the same way whether or not it is due', () => {
  it.each([
    ['a number', 5, 'a number'],
    ['an object', {}, 'an object'],
    ['an array', ['rt'], 'an array'],
  ])('a refreshToken that is %s rejects while the token is fresh', async (_name, refreshToken, kind) => {
    const m = new TokenManager()
    const refreshFn = good()
    for (const token of [{ ...fresh(), refreshToken }, { ...expired(), refreshToken }]) {
      const e = await failure(m.getValidToken(uid(), token, refreshFn))
      expect(e).toBeInstanceOf(TypeError)
      expect(e).toMatchObject({ code: 'INVALID_ARGUMENT', message: `token.refreshToken must be a string or null, not ${kind}` })
    }
    expect(refreshFn).not.toHaveBeenCalled()
    expect(m.stats()).toMatchObject({ users: 0, hits: 0 })
  })

  it('null and undefined refresh tokens are still fine', async () => {
    const m = new TokenManager()
    for (const refreshToken of [null, undefined]) {
      await expect(m.getValidToken(uid(), { ...fresh(), refreshToken }, good())).resolves.toMatchObject({ shouldUpdate: false })
    }
  })
})

describe('epoch seconds where epoch milliseconds belong', () => {
  const seconds = Math.floor(Date.now() / 1000) + 3600

  it('an expiresAt in seconds is a TypeError saying so, fresh or not', async () => {
    const m = new TokenManager()
    const refreshFn = good()
    for (const expiresAt of [seconds, 1e9, 1e11 - 1]) {
      const e = await failure(m.getValidToken(uid(), { accessToken: 'a', expiresAt }, refreshFn))
      expect(e).toBeInstanceOf(TypeError)
      expect(e).toMatchObject({ code: 'INVALID_ARGUMENT' })
      expect(e.message).toBe(`token.expiresAt is ${expiresAt}, which looks like epoch seconds: epoch milliseconds are expected (multiply by 1000, or pass a Date)`)
    }
    expect(refreshFn).not.toHaveBeenCalled()
  })

  it('numbers outside that window are epoch ms as before: 0 (expired), small fake clocks, real dates', async () => {
    const m = new TokenManager()
    await expect(m.getValidToken(uid(), { accessToken: 'a', expiresAt: 0 }, good())).resolves.toMatchObject({ shouldUpdate: true })
    await expect(m.getValidToken(uid(), { accessToken: 'a', expiresAt: Date.now() + HOUR }, good())).resolves.toMatchObject({ shouldUpdate: false })
    const early = new TokenManager({ now: () => 5_000 })
    await expect(early.getValidToken(uid(), { accessToken: 'a', expiresAt: 5_000 + HOUR }, good())).resolves.toMatchObject({ shouldUpdate: false })
  })

  it('a refresh result expiring in seconds is INVALID_REFRESH_RESULT saying so', async () => {
    const m = new TokenManager()
    const e = await failure(m.getValidToken(uid(), expired(), async () => ({ accessToken: 'n', expiresAt: seconds })))
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e.code).toBe('INVALID_REFRESH_RESULT')
    expect(e.message).toMatch(/expiresAt .*looks like epoch seconds/)
  })

  it('a now() returning seconds is a TypeError naming options.now()', async () => {
    const m = new TokenManager({ now: () => Math.floor(Date.now() / 1000) })
    const e = await failure(m.getValidToken(uid(), fresh(), good()))
    expect(e).toBeInstanceOf(TypeError)
    expect(e).toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.now\(\) returned \d+, which looks like epoch seconds/) })
  })
})

describe('a refresh result that is not what the manager takes says what is wrong', () => {
  const cases = [
    ['a refreshToken of the wrong type', { accessToken: 'n', refreshToken: 7, expiresIn: 60 }, /^refresh result has a refreshToken that is a number, not a string or null$/],
    ['the provider’s snake_case body', { access_token: 'n', refresh_token: 'r', expires_in: 3600, token_type: 'Bearer' }, /snake_case.*accessToken: body\.access_token.*expiresIn: body\.expires_in/],
    ['camelCase token, snake_case expiry', { accessToken: 'n', expires_in: 3600 }, /snake_case.*expiresIn: body\.expires_in/],
    ['no accessToken at all', { token: 'n', expiresIn: 60 }, /^refresh result has no accessToken$/],
    ['not an object', 'n', /^refresh result must be an object \{ accessToken, expiresIn or expiresAt, refreshToken\? \}, not a string$/],
    ['a date given as expiresIn', { accessToken: 'n', expiresIn: 1e12 }, /^refresh result has an expiresIn too large \(over 1e10 seconds\): expiresIn is the token's lifetime in seconds/],
    ['an expiresIn string', { accessToken: 'n', expiresIn: '3600' }, /^refresh result has an expiresIn that is a string, not a number of seconds$/],
  ]
  it.each(cases)('%s', async (_name, result, message) => {
    const m = new TokenManager()
    const e = await failure(m.getValidToken(uid(), expired(), async () => result))
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e.code).toBe('INVALID_REFRESH_RESULT')
    expect(e.message).toMatch(message)
    expect(e.message).not.toMatch(/"n"|\bn\b.*\bn\b/)
  })
})

describe('ctx.signal', () => {
  it('survives { ...ctx }: a wrapper passing a copy still aborts on the timeout', async () => {
    const m = new TokenManager({ refreshTimeoutMs: 50 })
    let copy
    const refreshFn = (ctx) => {
      copy = { ...ctx, extra: true }
      return new Promise((_resolve, reject) => copy.signal.addEventListener('abort', () => reject(copy.signal.reason)))
    }
    const e = await failure(m.getValidToken(uid(), expired(), refreshFn))
    expect(e.code).toBe('REFRESH_TIMEOUT')
    expect(copy.signal).toBeInstanceOf(AbortSignal)
    expect(copy.signal.aborted).toBe(true)
    expect(Object.keys(copy)).toEqual(expect.arrayContaining(['userId', 'refreshToken', 'signal']))
  })
})

describe('TokenRefreshError', () => {
  it('is built as the docs say: (code, message?, { userId?, cause?, status?, error? })', () => {
    const cause = new Error('socket hang up')
    const e = new TokenRefreshError('REAUTH_REQUIRED', 'the bank revoked the consent', { userId: 'u1', cause, status: 400, error: 'invalid_grant' })
    expect(e).toBeInstanceOf(Error)
    expect(e).toMatchObject({ name: 'TokenRefreshError', code: 'REAUTH_REQUIRED', message: 'the bank revoked the consent', userId: 'u1', status: 400, error: 'invalid_grant' })
    expect(e.cause).toBe(cause)
    expect(new TokenRefreshError('REFRESH_FAILED')).toMatchObject({ code: 'REFRESH_FAILED', message: '' })
    expect(new TokenRefreshError('REFRESH_FAILED', 'down')).toMatchObject({ code: 'REFRESH_FAILED', message: 'down', userId: '' })
  })

  it('the older (code, userId, message, options?) still works', () => {
    const cause = new Error('x')
    expect(new TokenRefreshError('REFRESH_FAILED', 'u2', 'failed', { cause, status: 503 })).toMatchObject({ code: 'REFRESH_FAILED', userId: 'u2', message: 'failed', cause, status: 503 })
    expect(new TokenRefreshError('REFRESH_FAILED', 'u3', 'failed')).toMatchObject({ userId: 'u3', message: 'failed' })
  })

  it('keeps its code when a refresh function throws one', async () => {
    const m = new TokenManager()
    const thrown = new TokenRefreshError('REAUTH_REQUIRED', 'reconnect the bank', { userId: 'x' })
    await expect(m.getValidToken(uid(), expired(), async () => {
      throw thrown
    })).rejects.toBe(thrown)
  })
})
