// The Rust <-> JS mapping of the slow-path calls bound to BindingManager's
// engine (`bindProtocol()`), as the table on `begin` (src/binding/manager.rs) writes it down
// and lib/manager.js decodes it: every answer `begin` and `complete` give,
// from a real engine driven into each state. A new variant on the Rust side
// fails here. Every call takes the caller's clock as its last argument
// (`now` here): the engine has none of its own.
import { createRequire } from 'node:module'
import { describe, expect, it } from 'vitest'

const require = createRequire(import.meta.url)
const { BindingManager } = require('../binding.js')

const HOUR = 3_600_000
const BUFFER = 300_000

/** A manager's native half, and its bound calls with `isFresh` beside them. */
function bound(native) {
  return { isFresh: (e, n) => native.isFresh(e, n), ...native.bindProtocol() }
}

function engine(options = {}) {
  const native = new BindingManager(options)
  return { native, raw: bound(native) }
}

describe('begin answers, as encoded', () => {
  it('null: the presented token is good', () => {
    const { raw } = engine()
    const now = Date.now()
    const exp = now + HOUR
    expect(raw.isFresh(exp, now)).toBe(true)
    expect(raw.begin('u', 'a', null, exp, now)).toBeNull()
    // Decided on the clock it is given: an hour later the same token is due.
    expect(raw.isFresh(exp, now + HOUR)).toBe(false)
    expect(typeof raw.begin('u', 'a', null, exp, now + HOUR)).toBe('number')
  })

  it('n >= 0 then n < 0: lead with the presented refresh token, then join that flight', () => {
    const { raw } = engine()
    const now = Date.now()
    const due = now + 1_000
    const lead = raw.begin('u', 'a', 'r0', due, now)
    expect(typeof lead === 'number' && lead >= 0).toBe(true)
    const join = raw.begin('u', 'a', 'r0', due, now)
    expect(join).toBe(-lead - 1)
    expect(raw.begin('u', 'a', 'r0', due, now)).toBe(-lead - 1)
  })

  it("{ kind: 'held' }: a token a refresh produced beats an older presented one", () => {
    const { raw } = engine()
    const now = Date.now()
    const flightId = raw.begin('u', 'old', 'r0', now + 1_000, now)
    // Rotated: the leader is handed the refresh token it passed.
    expect(raw.complete('u', flightId, 'new', 'r1', now + HOUR, null, now)).toBe(now + HOUR)
    const held = raw.begin('u', 'old', 'r0', now + 1_000, now)
    expect(held).toEqual({ kind: 'held', flightId: null, accessToken: 'new', refreshToken: 'r1', expiresAtMs: now + HOUR, shouldUpdate: true })
    // The caller presenting the held token itself is not told to update.
    expect(raw.begin('u', 'new', null, now + BUFFER, now)).toEqual({
      kind: 'held',
      flightId: null,
      accessToken: 'new',
      refreshToken: null,
      expiresAtMs: now + HOUR,
      shouldUpdate: false,
    })
  })

  it("{ kind: 'lead' }: lead with a newer refresh token the engine holds", () => {
    const raw = bound(new BindingManager({ doubleCheckWindowMs: 0, bufferTimeMs: 0 }))
    const now = Date.now()
    const first = raw.begin('u', 'a0', 'r0', now - 1, now)
    // Rotated: the engine now holds r1, about to expire.
    raw.complete('u', first, 'a1', 'r1', now + 50, null, now)
    // 60 ms later on the caller's clock, the held token has expired.
    const answer = raw.begin('u', 'a0', 'r0', now - 1, now + 60)
    expect(answer).toEqual({ kind: 'lead', flightId: expect.any(Number), accessToken: null, refreshToken: 'r1', expiresAtMs: null, shouldUpdate: null })
  })
})

describe('the caller\'s clock (nowMs)', () => {
  it('isFresh decides on the clock given', () => {
    // Years ahead: longer than maxTokenLifetimeMs's default allows.
    const { raw } = engine({ maxTokenLifetimeMs: 3_650 * 86_400_000 })
    const now = Date.now()
    const fake = Date.parse('2030-01-01T00:00:00Z')
    expect(raw.isFresh(fake - HOUR, fake)).toBe(false)
    expect(raw.isFresh(fake - HOUR, now)).toBe(true) // an hour before 2030 is years ahead today
    expect(raw.isFresh(now + BUFFER + 5_000, now)).toBe(true)
    expect(raw.isFresh(now + BUFFER - 5_000, now)).toBe(false)
  })

  it('a clock reading no Date can hold is not fresh, and begin and complete refuse it before doing anything', () => {
    const { native, raw } = engine()
    const now = Date.now()
    // napi-rs checks the types (lib/manager.js passes numbers); the core
    // refuses numbers out of range.
    for (const bad of [Number.NaN, Infinity, 9e15]) {
      expect(raw.isFresh(now + HOUR, bad)).toBe(false)
      expect(() => raw.begin('u', 'a', null, now + 1_000, bad)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^nowMs /) }))
      expect(() => native.stats(bad)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^nowMs /) }))
      expect(() => native.invalidate('u', null, bad)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    }
    expect(native.stats(now)).toMatchObject({ users: 0, inFlight: 0 })
    const id = raw.begin('u', 'a', null, now + 1_000, now)
    expect(() => raw.complete('u', id, 'b', null, now + HOUR, null, Number.NaN)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    expect(() => native.fail('u', id, false, Number.NaN)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    expect(native.stats(now).inFlight).toBe(1)
    native.fail('u', id, false, now)
    expect(native.stats(now).inFlight).toBe(0)
  })
})

describe('complete answers, as encoded', () => {
  it('e > 0: rotated, the caller is handed the refresh token; e < 0: kept, none handed', () => {
    const { raw } = engine()
    const now = Date.now()
    const a = raw.begin('u', 'a', 'r0', now + 1_000, now)
    const rotated = raw.complete('u', a, 'b', 'r1', now + HOUR, null, now)
    expect(rotated).toBe(now + HOUR)
    const v = raw.begin('v', 'a', 'r0', now + 1_000, now)
    const kept = raw.complete('v', v, 'b', null, now + HOUR, null, now)
    expect(kept).toBe(-(now + HOUR))
  })

  it('an unusable result throws INVALID_REFRESH_RESULT and ends the flight', () => {
    const { raw } = engine()
    const now = Date.now()
    const id = raw.begin('u', 'a', null, now + 1_000, now)
    expect(() => raw.complete('u', id, 'b', null, 1e300, null, now)).toThrow(expect.objectContaining({ code: 'INVALID_REFRESH_RESULT' }))
    expect(raw.begin('u', 'a', null, now + 1_000, now)).toBeGreaterThanOrEqual(0)
  })

  it('expiresIn is dated from the clock passed in, not the machine\'s', () => {
    const { raw } = engine()
    const fake = Date.parse('2030-01-01T00:00:00Z')
    const id = raw.begin('u', 'a', null, fake - 1, fake)
    expect(raw.complete('u', id, 'b', null, null, 3600, fake)).toBe(-(fake + HOUR))
  })
})

describe('BindingCoordinator', () => {
  it('a bad argument throws INVALID_ARGUMENT at once: it is not taken for Redis being down', () => {
    const { BindingCoordinator } = require('../binding.js')
    // Nothing listens on port 1: construction never waits on Redis.
    const c = new BindingCoordinator(
      new BindingManager({}),
      { url: 'redis://127.0.0.1:1', encryptionKeys: [Buffer.alloc(32, 7).toString('base64')] },
      () => {},
      () => {},
    )
    const now = Date.now()
    expect(() => c.acquire(1, 'u', 'a', 1e300, 1_000, now, true, true)).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^expiresAtMs /) }),
    )
    expect(() => c.acquire(2, 'u', 'a', now + HOUR, 1_000, Number.NaN, true, true)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    expect(
      () =>
        new BindingCoordinator(
          new BindingManager({}),
          { url: 'redis://127.0.0.1:1', encryptionKeys: [Buffer.alloc(32, 7).toString('base64')], onError: 'sometimes' },
          () => {},
          () => {},
        ),
    ).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.redis\.onError /) }))
  })
})
