// The hot path's bound native check and the refresh path's compact native
// answers (numbers for lead / join, an expiry for complete), through the
// public API: what a caller sees must not depend on which encoding crossed.
import { describe, expect, it } from 'vitest'
import { TokenManager } from '../index.mjs'

const MIN = 60_000
const HOUR = 60 * MIN
const later = (ms) => new Date(Date.now() + ms)

function counting(result, delayMs = 0) {
  const fn = async (ctx) => {
    fn.calls.push(ctx.refreshToken)
    if (delayMs) await new Promise((r) => setTimeout(r, delayMs))
    return typeof result === 'function' ? result() : result
  }
  fn.calls = []
  return fn
}

describe('hot path', () => {
  it('decides at the buffer edge as the core policy does', async () => {
    const m = new TokenManager({ bufferTimeMs: 5 * MIN })
    const refreshFn = counting({ accessToken: 'new', expiresAt: later(HOUR) })
    // Well clear of the edge on both sides (the check reads the clock).
    const fresh = await m.getValidToken('u', { accessToken: 'a', expiresAt: later(5 * MIN + 2_000) }, refreshFn)
    expect(fresh).toMatchObject({ accessToken: 'a', shouldUpdate: false })
    expect(refreshFn.calls).toHaveLength(0)
    const due = await m.getValidToken('u', { accessToken: 'a', expiresAt: later(5 * MIN - 2_000) }, refreshFn)
    expect(due).toMatchObject({ accessToken: 'new', shouldUpdate: true })
    expect(refreshFn.calls).toHaveLength(1)
  })

  it('counts hits and keeps the Date it was given', async () => {
    const m = new TokenManager()
    const expiresAt = later(HOUR)
    const r = await m.getValidToken('u', { accessToken: 'a', expiresAt }, counting({}))
    expect(r.expiresAt).toBe(expiresAt)
    expect(m.stats().hits).toBe(1)
  })

  it('accepts epoch ms and ISO strings', async () => {
    const m = new TokenManager()
    const ms = Date.now() + HOUR
    const a = await m.getValidToken('u', { accessToken: 'a', expiresAt: ms }, counting({}))
    expect(a.expiresAt.getTime()).toBe(ms)
    const b = await m.getValidToken('u', { accessToken: 'a', expiresAt: new Date(ms).toISOString() }, counting({}))
    expect(b.expiresAt.getTime()).toBe(ms)
  })

  it('is per manager: a revocation in one does not slow the other', async () => {
    const a = new TokenManager()
    const b = new TokenManager()
    a.invalidate('u', 'tok')
    const fnA = counting({ accessToken: 'new', expiresAt: later(HOUR) })
    const fnB = counting({ accessToken: 'new', expiresAt: later(HOUR) })
    await a.getValidToken('u', { accessToken: 'tok', expiresAt: later(HOUR) }, fnA)
    await b.getValidToken('u', { accessToken: 'tok', expiresAt: later(HOUR) }, fnB)
    expect(fnA.calls).toHaveLength(1)
    expect(fnB.calls).toHaveLength(0)
  })
})

describe('refresh path', () => {
  it('leads, joins and hands the leader the rotated refresh token', async () => {
    const m = new TokenManager()
    const refreshFn = counting({ accessToken: 'new', refreshToken: 'rt-2', expiresAt: later(HOUR) }, 20)
    const token = { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }
    const results = await Promise.all([1, 2, 3].map(() => m.getValidToken('u', token, refreshFn)))
    expect(refreshFn.calls).toEqual(['rt-1'])
    expect(results.map((r) => r.shouldUpdate)).toEqual([true, false, false])
    expect(results[0]).toEqual({ accessToken: 'new', shouldUpdate: true, expiresAt: expect.any(Date), refreshToken: 'rt-2' })
    for (const r of results.slice(1)) expect(r).toEqual({ accessToken: 'new', shouldUpdate: false, expiresAt: results[0].expiresAt })
    expect(m.stats()).toMatchObject({ refreshes: 1, coalesced: 2, inFlight: 0 })
  })

  it('hands the leader no refresh token when the provider keeps it', async () => {
    const m = new TokenManager()
    for (const returned of [undefined, null, '']) {
      const user = `u-${String(returned)}`
      const refreshFn = counting({ accessToken: 'new', refreshToken: returned, expiresIn: 3600 })
      const r = await m.getValidToken(user, { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(-1) }, refreshFn)
      expect(r).toEqual({ accessToken: 'new', shouldUpdate: true, expiresAt: expect.any(Date) })
      expect(r.expiresAt.getTime()).toBeGreaterThan(Date.now() + HOUR - 5_000)
      // The core kept the one it started with: the next refresh uses it.
      m.invalidate(user, 'new')
      const next = counting({ accessToken: 'newer', expiresIn: 3600 })
      await m.getValidToken(user, { accessToken: 'new', expiresAt: later(HOUR - MIN) }, next)
      expect(next.calls).toEqual(['rt-1'])
    }
  })

  it('leaves refreshToken out when there is none', async () => {
    const m = new TokenManager()
    const r = await m.getValidToken('u', { accessToken: 'old', expiresAt: later(-1) }, counting({ accessToken: 'new', expiresIn: 60 * 60 }))
    expect(r).toEqual({ accessToken: 'new', shouldUpdate: true, expiresAt: expect.any(Date) })
  })

  it('serves the held token to a caller presenting the old one', async () => {
    const m = new TokenManager()
    const refreshFn = counting({ accessToken: 'new', refreshToken: 'rt-2', expiresAt: later(HOUR) })
    const old = { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }
    await m.getValidToken('u', old, refreshFn)
    const again = await m.getValidToken('u', old, refreshFn)
    expect(refreshFn.calls).toHaveLength(1)
    expect(again).toMatchObject({ accessToken: 'new', shouldUpdate: true, refreshToken: 'rt-2' })
  })

  it('refreshes with the rotated refresh token the core holds', async () => {
    const m = new TokenManager()
    // One expiry for the held token and the caller's copy of it: a caller
    // presenting a newer one than the held would keep its own refresh token.
    const expiresAt = later(HOUR)
    const first = counting({ accessToken: 'new', refreshToken: 'rt-2', expiresAt })
    await m.getValidToken('u', { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }, first)
    // The held token is revoked; the caller still has the pre-rotation copy.
    m.invalidate('u', 'new')
    const second = counting({ accessToken: 'newer', expiresAt: later(2 * HOUR) })
    const r = await m.getValidToken('u', { accessToken: 'new', refreshToken: 'rt-1', expiresAt }, second)
    expect(second.calls).toEqual(['rt-2'])
    expect(r).toEqual({ accessToken: 'newer', shouldUpdate: true, expiresAt: expect.any(Date) })
  })

  it('refreshes distinct users in parallel, once each', async () => {
    const m = new TokenManager()
    let n = 0
    const refreshFn = async () => ({ accessToken: `new-${n++}`, expiresAt: later(HOUR) })
    const token = { accessToken: 'old', refreshToken: 'rt', expiresAt: later(-1) }
    const results = await Promise.all(Array.from({ length: 500 }, (_, i) => m.getValidToken(`user-${i}`, token, refreshFn)))
    expect(n).toBe(500)
    expect(new Set(results.map((r) => r.accessToken)).size).toBe(500)
    expect(results.every((r) => r.shouldUpdate)).toBe(true)
    expect(m.stats()).toMatchObject({ users: 500, refreshes: 500, inFlight: 0 })
  })

  it('rejects an invalid result for the leader and every waiter', async () => {
    const m = new TokenManager()
    const refreshFn = counting({ accessToken: '', expiresAt: later(HOUR) }, 10)
    const token = { accessToken: 'old', expiresAt: later(-1) }
    const settled = await Promise.allSettled([1, 2].map(() => m.getValidToken('u', token, refreshFn)))
    for (const s of settled) expect(s).toMatchObject({ status: 'rejected', reason: { code: 'INVALID_REFRESH_RESULT' } })
    expect(refreshFn.calls).toHaveLength(1)
  })
})
