// "Now" is the app's clock: `Date.now()` as the app sees it at call time,
// so fake timers (vi.useFakeTimers / vi.setSystemTime here; jest and sinon
// replace Date the same way) move every decision made for a caller, as they
// did with the TypeScript module this package replaces. The same scenarios
// then run on real timers, with managers made under fake ones.
import dc from 'node:diagnostics_channel'
import { createRequire } from 'node:module'

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'

import { TokenManager, getValidToken } from '../index.mjs'

const SECOND = 1_000
const MIN = 60_000
const HOUR = 3_600_000
const at = (iso) => new Date(iso)
const T0 = at('2030-01-01T00:00:00Z')
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
/** Waits real time, even under fake timers (the timer is taken before they are installed). */
const realSleep = ((realSetTimeout) => (ms) => new Promise((resolve) => realSetTimeout(resolve, ms)))(globalThis.setTimeout)

/** A refresh function counting its runs, answering `expiresIn` seconds (default 1 h). */
function refresher(expiresIn = 3600) {
  let n = 0
  const fn = vi.fn(async () => {
    n++
    return { accessToken: `a${n}`, refreshToken: `r${n}`, expiresIn }
  })
  return fn
}

/** A refresh function that never settles, and the contexts it was given. */
function hanging() {
  const contexts = []
  const fn = (ctx) => {
    contexts.push(ctx)
    return new Promise(() => {})
  }
  return { fn, contexts }
}

/** Managers made under fake timers, used again under real ones below. */
const madeUnderFakeTimers = []

describe('under fake timers (vi.useFakeTimers, vi.setSystemTime)', () => {
  beforeEach(() => {
    vi.useFakeTimers()
    vi.setSystemTime(T0)
  })
  afterEach(() => {
    vi.useRealTimers()
  })

  it('a token is refreshed once the clock is moved into the buffer (the process-wide getValidToken too)', async () => {
    // `getValidToken` is the singleton, made when the module loaded, before
    // the fake timers: it follows them all the same.
    const token = { accessToken: 'a0', refreshToken: 'r0', expiresAt: at('2030-01-01T01:00:00Z') }
    const refreshFn = refresher()
    expect(await getValidToken('ft-buffer', token, refreshFn)).toEqual({ accessToken: 'a0', shouldUpdate: false, expiresAt: token.expiresAt })
    vi.setSystemTime(at('2030-01-01T00:54:59Z')) // 5 min 1 s left: still beyond the buffer
    expect((await getValidToken('ft-buffer', token, refreshFn)).shouldUpdate).toBe(false)
    vi.setSystemTime(at('2030-01-01T00:56:00Z')) // 4 min left: inside the 5-minute buffer
    const r = await getValidToken('ft-buffer', token, refreshFn)
    expect(r).toEqual({ accessToken: 'a1', refreshToken: 'r1', shouldUpdate: true, expiresAt: at('2030-01-01T01:56:00Z') })
    expect(refreshFn).toHaveBeenCalledTimes(1)

    const m = new TokenManager()
    madeUnderFakeTimers.push(m)
    expect((await m.getValidToken('u', token, refresher())).shouldUpdate).toBe(true)
  })

  it('a token that expired at 2029-12-31T23:00Z is not served as fresh at a fake 2030-01-01T00:00Z', async () => {
    const token = { accessToken: 'old', refreshToken: 'r0', expiresAt: at('2029-12-31T23:00:00Z') }
    for (const m of [new TokenManager(), { getValidToken }]) {
      const refreshFn = refresher()
      const r = await m.getValidToken('ft-expired', token, refreshFn)
      expect(r.accessToken).toBe('a1')
      expect(r.shouldUpdate).toBe(true)
      expect(refreshFn).toHaveBeenCalledTimes(1)
    }
    // The same, with the expiry as epoch ms and as an ISO string.
    for (const expiresAt of [Date.parse('2029-12-31T23:00:00Z'), '2029-12-31T23:00:00Z']) {
      const refreshFn = refresher()
      await new TokenManager().getValidToken('u', { accessToken: 'old', expiresAt }, refreshFn)
      expect(refreshFn).toHaveBeenCalledTimes(1)
    }
  })

  it('expiresIn is dated from the fake clock', async () => {
    const m = new TokenManager()
    const r = await m.getValidToken('u', { accessToken: 'old', refreshToken: 'r0', expiresAt: T0 }, refresher(3600))
    expect(r.expiresAt).toEqual(at('2030-01-01T01:00:00Z'))
    // A refresh that settles later is dated from when it settled.
    vi.setSystemTime(at('2030-06-01T12:00:00Z'))
    const slow = (ctx) => new Promise((resolve) => setTimeout(() => resolve({ accessToken: 'b', refreshToken: ctx.refreshToken, expiresIn: 600 }), 20 * SECOND))
    const pending = m.getValidToken('v', { accessToken: 'old', refreshToken: 'r0', expiresAt: T0 }, slow)
    await vi.advanceTimersByTimeAsync(20 * SECOND)
    expect((await pending).expiresAt).toEqual(at('2030-06-01T12:10:20Z'))
  })

  it('the double-check window runs on the fake clock', async () => {
    // Short-lived tokens (15 s: past half their lifetime, their buffer,
    // after 7.5 s) are still handed out without another refresh within 10 s
    // of the last one.
    const m = new TokenManager({ doubleCheckWindowMs: 10 * SECOND })
    const refreshFn = refresher(15)
    const old = { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0 }
    const first = await m.getValidToken('u', old, refreshFn)
    expect(first).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
    vi.setSystemTime(T0.getTime() + 9 * SECOND)
    // Still presenting the old token (a lost write): handed the new one.
    expect(await m.getValidToken('u', old, refreshFn)).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
    const held = { accessToken: 'a1', refreshToken: 'r1', expiresAt: first.expiresAt }
    expect(await m.getValidToken('u', held, refreshFn)).toMatchObject({ accessToken: 'a1', shouldUpdate: false })
    expect(refreshFn).toHaveBeenCalledTimes(1)
    vi.setSystemTime(T0.getTime() + 11 * SECOND)
    expect(await m.getValidToken('u', held, refreshFn)).toMatchObject({ accessToken: 'a2', shouldUpdate: true })
    expect(refreshFn).toHaveBeenCalledTimes(2)
  })

  it('idle users are evicted by advancing time', async () => {
    const m = new TokenManager({ idleTtlMs: MIN })
    madeUnderFakeTimers.push(m)
    const refreshFn = refresher()
    const old = { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0 }
    await m.getValidToken('u', old, refreshFn)
    vi.advanceTimersByTime(59 * SECOND)
    expect(m.stats().users).toBe(1)
    // Within the TTL a caller still presenting the old token is handed the new one...
    expect(await m.getValidToken('u', old, refreshFn)).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
    vi.advanceTimersByTime(MIN)
    expect(m.stats().users).toBe(0)
    // ...after it, the user is forgotten and the old token refreshes again.
    expect(await m.getValidToken('u', old, refreshFn)).toMatchObject({ accessToken: 'a2', shouldUpdate: true })
    expect(refreshFn).toHaveBeenCalledTimes(2)
  })

  it('the background eviction keeps to the fake clock: users stamped at a fake 2020 are not years idle', async () => {
    vi.setSystemTime(at('2020-01-01T00:00:00Z'))
    const m = new TokenManager({ idleTtlMs: MIN })
    const old = { accessToken: 'a0', refreshToken: 'r0', expiresAt: Date.now() - 1 }
    const refreshFn = refresher()
    await m.getValidToken('u', old, refreshFn)
    // The background task runs on real time (every second at most): by the
    // machine's date the user has been idle for years; by the app's, no.
    await realSleep(1_500)
    expect(m.stats().users).toBe(1)
    expect(await m.getValidToken('u', old, refreshFn)).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
    vi.advanceTimersByTime(MIN + SECOND)
    expect(m.stats().users).toBe(0)
    expect(refreshFn).toHaveBeenCalledTimes(1)
  })

  it('an invalidation lasts one idle TTL on the fake clock', async () => {
    const m = new TokenManager({ idleTtlMs: MIN })
    const fresh = { accessToken: 'a0', refreshToken: 'r0', expiresAt: at('2030-01-01T01:00:00Z') }
    m.invalidate('u', 'a0')
    m.invalidate('v', 'a0')
    vi.setSystemTime(T0.getTime() + 30 * SECOND)
    const refreshU = refresher()
    expect((await m.getValidToken('u', fresh, refreshU)).accessToken).toBe('a1')
    vi.setSystemTime(T0.getTime() + 61 * SECOND)
    const refreshV = refresher()
    expect(await m.getValidToken('v', fresh, refreshV)).toMatchObject({ accessToken: 'a0', shouldUpdate: false })
    expect(refreshV).not.toHaveBeenCalled()
  })

  it('the refresh timeout fires with vi.advanceTimersByTimeAsync, and a stale token is judged on the fake clock', async () => {
    const m = new TokenManager({ refreshTimeoutMs: 30 * SECOND })
    const { fn, contexts } = hanging()
    const expired = m.getValidToken('u', { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0 }, fn)
    const outcome = expired.then(
      () => 'resolved',
      (e) => e,
    )
    await vi.advanceTimersByTimeAsync(30 * SECOND - 1)
    expect(contexts[0].signal.aborted).toBe(false)
    await vi.advanceTimersByTimeAsync(1)
    expect(await outcome).toMatchObject({ name: 'TokenRefreshError', code: 'REFRESH_TIMEOUT' })
    expect(contexts[0].signal.aborted).toBe(true)
    expect(m.stats()).toMatchObject({ timeouts: 1, inFlight: 0 })

    // Due but unexpired when the refresh times out: the caller keeps it.
    const due = { accessToken: 'b0', refreshToken: 'r0', expiresAt: new Date(Date.now() + 4 * MIN) }
    const kept = m.getValidToken('v', due, hanging().fn)
    await vi.advanceTimersByTimeAsync(30 * SECOND)
    expect(await kept).toEqual({ accessToken: 'b0', shouldUpdate: false, expiresAt: due.expiresAt })
    // Unexpired when asked, expired by the (fake) time the refresh timed out.
    const brief = { accessToken: 'c0', refreshToken: 'r0', expiresAt: new Date(Date.now() + 20 * SECOND) }
    const lost = m.getValidToken('w', brief, hanging().fn).catch((e) => e)
    await vi.advanceTimersByTimeAsync(30 * SECOND)
    expect(await lost).toMatchObject({ code: 'REFRESH_TIMEOUT' })
    expect(m.stats()).toMatchObject({ timeouts: 3, staleServed: 1 })
  })

  it('a spied Date.now moves it too, and a broken one is named in the error', async () => {
    const m = new TokenManager()
    const token = { accessToken: 'a0', refreshToken: 'r0', expiresAt: at('2030-01-01T01:00:00Z') }
    const spy = vi.spyOn(Date, 'now').mockReturnValue(Date.parse('2030-01-01T00:58:00Z'))
    try {
      expect((await m.getValidToken('u', token, refresher())).shouldUpdate).toBe(true)
      spy.mockReturnValue(undefined)
      await expect(m.getValidToken('v', token, refresher())).rejects.toMatchObject({
        name: 'TypeError',
        code: 'INVALID_ARGUMENT',
        message: expect.stringMatching(/^Date\.now\(\) must return a number/),
      })
      // One that throws is named too, with what it threw as the cause.
      const broken = new Error('clock broken')
      spy.mockImplementation(() => {
        throw broken
      })
      await expect(m.getValidToken('w', token, refresher())).rejects.toMatchObject({
        name: 'TypeError',
        code: 'INVALID_ARGUMENT',
        message: 'Date.now() threw (see cause)',
        cause: broken,
      })
    } finally {
      spy.mockRestore()
    }
  })

  it('a manager loaded while Date was already fake (jest: fakeTimers.enableGlobally) follows both clocks', async () => {
    const require = createRequire(import.meta.url)
    const path = require.resolve('../lib/manager.js')
    const cached = require.cache[path]
    delete require.cache[path]
    let Loaded
    try {
      Loaded = require('../lib/manager.js').TokenManager
    } finally {
      require.cache[path] = cached
    }
    expect(Loaded).not.toBe(TokenManager)
    const m = new Loaded()
    const token = { accessToken: 'a0', refreshToken: 'r0', expiresAt: at('2029-12-31T23:00:00Z') }
    expect((await m.getValidToken('u', token, refresher())).shouldUpdate).toBe(true)
    vi.useRealTimers()
    const refreshFn = refresher()
    expect((await m.getValidToken('v', { ...token, expiresAt: Date.now() + HOUR }, refreshFn)).shouldUpdate).toBe(false)
    expect((await m.getValidToken('v', { ...token, expiresAt: Date.now() + MIN }, refreshFn)).shouldUpdate).toBe(true)
  })

  it('a route test as an app writes it (docs/testing.md)', async () => {
    // The route: read the row, get a valid token, persist it when told to.
    const db = new Map()
    const manager = new TokenManager()
    const refreshFn = vi.fn(async () => ({ accessToken: 'new', refreshToken: 'r1', expiresIn: 3600 }))
    async function GET(userId) {
      const token = await manager.getValidToken(userId, db.get(userId), refreshFn)
      if (token.shouldUpdate) db.set(userId, { accessToken: token.accessToken, refreshToken: token.refreshToken, expiresAt: token.expiresAt })
      return Response.json({ ok: true })
    }
    db.set('u1', { accessToken: 'old', refreshToken: 'r0', expiresAt: at('2030-01-01T00:30:00Z') })
    await GET('u1')
    expect(refreshFn).not.toHaveBeenCalled() // 30 minutes left
    vi.setSystemTime(at('2030-01-01T00:26:00Z')) // 4 minutes left: inside the buffer
    expect((await GET('u1')).status).toBe(200)
    expect(refreshFn).toHaveBeenCalledOnce()
    expect(db.get('u1')).toEqual({ accessToken: 'new', refreshToken: 'r1', expiresAt: at('2030-01-01T01:26:00Z') })
  })
})

describe('a `now` option', () => {
  it('is the clock every decision uses', async () => {
    let t = T0.getTime()
    const m = new TokenManager({ now: () => t, idleTtlMs: MIN })
    const token = { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0.getTime() + HOUR }
    const refreshFn = refresher()
    expect((await m.getValidToken('u', token, refreshFn)).shouldUpdate).toBe(false)
    t += 56 * MIN
    const r = await m.getValidToken('u', token, refreshFn)
    expect(r).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
    expect(r.expiresAt.getTime()).toBe(t + HOUR)
    expect(m.stats().users).toBe(1)
    t += 2 * MIN
    expect(m.stats().users).toBe(0)
  })

  it('the refresh reason observers see is judged on it too', async () => {
    const m = new TokenManager({ now: () => T0.getTime() })
    const reasons = []
    const handlers = { asyncEnd: (message) => reasons.push(message.reason) }
    const tc = dc.tracingChannel('tarabut-token-manager:refresh')
    tc.subscribe(handlers)
    try {
      // Expired by that clock, though years ahead of the machine's.
      await m.getValidToken('u', { accessToken: 'a0', expiresAt: at('2029-12-31T23:00:00Z') }, refresher())
      await m.getValidToken('v', { accessToken: 'b0', expiresAt: T0.getTime() + 4 * MIN }, refresher())
    } finally {
      tc.unsubscribe(handlers)
    }
    expect(reasons).toEqual(['expired', 'buffer'])
  })

  it('must be a function', () => {
    for (const now of [123, 'Date.now', null, {}]) {
      expect(() => new TokenManager({ now })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.now must be a function/) }))
    }
    // Date.now itself is fine (and is the default).
    expect(() => new TokenManager({ now: Date.now })).not.toThrow()
  })

  it('a clock that throws or gives no epoch ms rejects the call with a typed error and leaves nothing behind', async () => {
    const boom = new Error('clock broke')
    let reading = () => T0.getTime()
    const m = new TokenManager({ now: () => reading() })
    const token = { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0.getTime() + HOUR }
    const refreshFn = refresher()
    const cases = [
      [
        () => {
          throw boom
        },
        { name: 'TypeError', code: 'INVALID_ARGUMENT', message: 'options.now() threw (see cause)', cause: boom },
      ],
      [() => '2030-01-01', { name: 'TypeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.now\(\) must return a number/) }],
      [() => undefined, { name: 'TypeError', code: 'INVALID_ARGUMENT' }],
      [() => Number.NaN, { name: 'RangeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.now\(\) returned a number no Date can hold/) }],
      [() => 9e15, { name: 'RangeError', code: 'INVALID_ARGUMENT' }],
    ]
    for (const [broken, error] of cases) {
      reading = broken
      // Fresh, due and expired tokens alike: the clock is read before anything.
      for (const expiresAt of [T0.getTime() + HOUR, T0.getTime() + MIN, T0.getTime() - MIN]) {
        await expect(m.getValidToken('u', { ...token, expiresAt }, refreshFn)).rejects.toMatchObject(error)
      }
      expect(() => m.invalidate('u', 'a0')).toThrow(expect.objectContaining(error))
      expect(() => m.stats()).toThrow(expect.objectContaining(error))
    }
    reading = () => T0.getTime()
    expect(refreshFn).not.toHaveBeenCalled()
    expect(m.stats()).toMatchObject({ users: 0, inFlight: 0, hits: 0, refreshes: 0, failures: 0 })
    // Nothing was invalidated: the token is served as it is.
    expect(await m.getValidToken('u', token, refreshFn)).toMatchObject({ accessToken: 'a0', shouldUpdate: false })
  })

  it('a clock that breaks while a refresh runs does not lose the refreshed token', async () => {
    let reading = () => T0.getTime()
    const m = new TokenManager({ now: () => reading() })
    let finish
    const refreshFn = () => new Promise((resolve) => (finish = resolve))
    const pending = m.getValidToken('u', { accessToken: 'a0', refreshToken: 'r0', expiresAt: T0.getTime() - 1 }, refreshFn)
    reading = () => {
      throw new Error('clock broke')
    }
    finish({ accessToken: 'a1', refreshToken: 'r1', expiresIn: 60 })
    // Dated from the reading the call began with.
    expect(await pending).toMatchObject({ accessToken: 'a1', refreshToken: 'r1', shouldUpdate: true, expiresAt: new Date(T0.getTime() + MIN) })
    reading = () => T0.getTime()
    expect(m.stats()).toMatchObject({ inFlight: 0, refreshes: 1 })
  })
})

describe('on real timers again (vi.useRealTimers)', () => {
  it('managers made under fake timers, and the singleton, follow the real clock', async () => {
    expect(madeUnderFakeTimers.length).toBe(2)
    for (const m of [...madeUnderFakeTimers, { getValidToken }]) {
      const refreshFn = refresher(3600)
      const fresh = { accessToken: 'a0', refreshToken: 'r0', expiresAt: new Date(Date.now() + HOUR) }
      expect((await m.getValidToken('real', fresh, refreshFn)).shouldUpdate).toBe(false)
      const due = { accessToken: 'a0', refreshToken: 'r0', expiresAt: new Date(Date.now() + 4 * MIN) }
      const before = Date.now()
      const r = await m.getValidToken('real', due, refreshFn)
      const after = Date.now()
      expect(r).toMatchObject({ accessToken: 'a1', shouldUpdate: true })
      // expiresIn dated from the real clock.
      expect(r.expiresAt.getTime()).toBeGreaterThanOrEqual(before + HOUR)
      expect(r.expiresAt.getTime()).toBeLessThanOrEqual(after + HOUR)
      expect(refreshFn).toHaveBeenCalledTimes(1)
    }
  })

  it('a token that expired an hour ago is refreshed; one valid for an hour is not', async () => {
    const m = new TokenManager()
    const refreshFn = refresher()
    expect((await m.getValidToken('u', { accessToken: 'a0', expiresAt: Date.now() - HOUR }, refreshFn)).accessToken).toBe('a1')
    expect((await m.getValidToken('v', { accessToken: 'b0', expiresAt: Date.now() + HOUR }, refreshFn)).accessToken).toBe('b0')
    expect(refreshFn).toHaveBeenCalledTimes(1)
  })

  it('the double-check window, idle eviction and the timeout run on real time', async () => {
    // 1 s tokens: past half their lifetime (their buffer) after 500 ms.
    const m = new TokenManager({ doubleCheckWindowMs: 150, idleTtlMs: 300, refreshTimeoutMs: 50 })
    const refreshFn = refresher(1)
    const old = { accessToken: 'a0', refreshToken: 'r0', expiresAt: Date.now() - 1 }
    const first = await m.getValidToken('u', old, refreshFn)
    const held = { accessToken: first.accessToken, refreshToken: 'r1', expiresAt: first.expiresAt }
    expect((await m.getValidToken('u', held, refreshFn)).accessToken).toBe('a1')
    await sleep(550)
    expect((await m.getValidToken('u', held, refreshFn)).accessToken).toBe('a2')
    expect(m.stats().users).toBe(1)
    await sleep(400)
    expect(m.stats().users).toBe(0)

    const { fn, contexts } = hanging()
    const started = Date.now()
    await expect(m.getValidToken('v', old, fn)).rejects.toMatchObject({ code: 'REFRESH_TIMEOUT' })
    expect(Date.now() - started).toBeGreaterThanOrEqual(45)
    expect(contexts[0].signal.aborted).toBe(true)
  })

  it('a token that expired at 2029-12-31T23:00Z is what the real date says it is', async () => {
    // Years ahead of the real date: longer than maxTokenLifetimeMs's default allows.
    const m = new TokenManager({ maxTokenLifetimeMs: 3_650 * 86_400_000 })
    const refreshFn = refresher()
    const r = await m.getValidToken('u', { accessToken: 'a0', expiresAt: at('2029-12-31T23:00:00Z') }, refreshFn)
    const expired = Date.now() >= at('2029-12-31T22:55:00Z').getTime()
    expect(r.accessToken).toBe(expired ? 'a1' : 'a0')
  })
})
