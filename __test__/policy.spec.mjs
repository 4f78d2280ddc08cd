// The hot path decides in JavaScript (lib/policy.js) what the core decides
// everywhere else (Policy::is_fresh in src/engine/policy.rs): a token is
// handed back without a refresh only while it outlives the buffer. These
// properties hold the two equal on any input, boundaries included, and show
// that getValidToken refreshes exactly when the core's rule says so, on the
// app's clock (`now` option) and on the system clock.
import { createRequire } from 'node:module'
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'

import { TokenManager } from '../index.mjs'

const require = createRequire(import.meta.url)
const { BindingManager } = require('../binding.js')
const { isFresh } = require('../lib/policy.js')

const MAX_DATE_MS = 8.64e15
const BUFFERS = [0, 1, 300_000, 2_147_483_647]
const cores = new Map(BUFFERS.map((b) => [b, new BindingManager({ bufferTimeMs: b })]))

/** Times near the interesting edges, fractions and non-finite values included. */
const instant = fc.oneof(
  fc.double({ noNaN: false }),
  fc.integer({ min: -2_000_000_000_000, max: 4_000_000_000_000 }),
  fc.constantFrom(0, -0, MAX_DATE_MS, -MAX_DATE_MS, MAX_DATE_MS + 1, -MAX_DATE_MS - 1, MAX_DATE_MS + 0.5, -MAX_DATE_MS - 0.5, NaN, Infinity, -Infinity),
)

const looksLikeSeconds = (n) => n >= 1e9 && n < 1e11

/** An expiry near `now + buffer`: the edge the rule decides on. */
const nearEdge = fc.record({
  now: fc.oneof(fc.integer({ min: -MAX_DATE_MS, max: MAX_DATE_MS }), fc.double({ min: -MAX_DATE_MS, max: MAX_DATE_MS, noNaN: true })),
  buffer: fc.constantFrom(...BUFFERS),
  offset: fc.oneof(fc.integer({ min: -3, max: 3 }), fc.double({ min: -3, max: 3, noNaN: true })),
})

describe('the hot path’s buffer rule is the core’s', () => {
  it('on any pair of times and every buffer', () => {
    fc.assert(
      fc.property(instant, instant, fc.constantFrom(...BUFFERS), (expiresAt, now, buffer) => {
        expect(isFresh(expiresAt, now, buffer)).toBe(cores.get(buffer).isFresh(expiresAt, now))
      }),
      { numRuns: 20_000 },
    )
  })

  it('at the edge: expiries a few ms either side of now + buffer, whole and fractional', () => {
    fc.assert(
      fc.property(nearEdge, ({ now, buffer, offset }) => {
        const expiresAt = now + buffer + offset
        expect(isFresh(expiresAt, now, buffer)).toBe(cores.get(buffer).isFresh(expiresAt, now))
      }),
      { numRuns: 20_000 },
    )
    // The boundary itself: exactly `buffer` left is due, one ms more is not.
    const core = cores.get(300_000)
    for (const [left, fresh] of [
      [300_000, false],
      [300_000.999, false],
      [300_001, true],
    ]) {
      expect(isFresh(1_000_000 + left, 1_000_000, 300_000)).toBe(fresh)
      expect(core.isFresh(1_000_000 + left, 1_000_000)).toBe(fresh)
    }
  })
})

describe('maxTokenLifetimeMs: no token is taken to live longer', () => {
  const LIFETIMES = [300_001, 86_400_000, 30 * 86_400_000]
  const limited = new Map(LIFETIMES.map((l) => [l, new BindingManager({ bufferTimeMs: 300_000, maxTokenLifetimeMs: l })]))

  it('the hot path’s rule is the core’s, at the far edge too, for any lifetime', () => {
    const farEdge = fc.record({
      now: fc.integer({ min: -4_000_000_000_000, max: 4_000_000_000_000 }),
      lifetime: fc.constantFrom(...LIFETIMES),
      offset: fc.oneof(fc.integer({ min: -3, max: 3 }), fc.double({ min: -3, max: 3, noNaN: true })),
    })
    fc.assert(
      fc.property(farEdge, ({ now, lifetime, offset }) => {
        const expiresAt = now + lifetime + offset
        expect(isFresh(expiresAt, now, 300_000, lifetime)).toBe(limited.get(lifetime).isFresh(expiresAt, now))
      }),
      { numRuns: 20_000 },
    )
    // The default (30 days) is the core's default.
    const now = 1_700_000_000_000
    for (const left of [30 * 86_400_000, 30 * 86_400_000 + 1]) expect(isFresh(now + left, now, 300_000)).toBe(cores.get(300_000).isFresh(now + left, now))
    expect(cores.get(300_000).isFresh(now + 30 * 86_400_000 + 1, now)).toBe(false)
  })

  it('a refresh result is capped to it, and a presented token claiming longer is refreshed', async () => {
    const now = 1_700_000_000_000
    const manager = new TokenManager({ now: () => now, maxTokenLifetimeMs: 86_400_000 })
    let refreshes = 0
    const refreshFn = () => {
      refreshes++
      return { accessToken: `t${refreshes}`, expiresIn: 1e10 }
    }
    const first = await manager.getValidToken('u', { accessToken: 'old', expiresAt: now + 365 * 86_400_000 }, refreshFn)
    expect(refreshes).toBe(1)
    expect(first).toMatchObject({ accessToken: 't1', shouldUpdate: true })
    expect(first.expiresAt.getTime()).toBe(now + 86_400_000)
    // As capped, it is fresh.
    const again = await manager.getValidToken('u', { accessToken: 't1', expiresAt: first.expiresAt }, refreshFn)
    expect(again.accessToken).toBe('t1')
    expect(refreshes).toBe(1)
    expect(() => new TokenManager({ bufferTimeMs: 600_000, maxTokenLifetimeMs: 600_000 })).toThrow(expect.objectContaining({ name: 'RangeError', code: 'INVALID_ARGUMENT' }))
    expect(() => new TokenManager({ maxTokenLifetimeMs: '1d' })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT' }))
    await manager.close()
  })
})

describe('getValidToken refreshes exactly when the core’s rule says the token is due', () => {
  it('on the app’s clock (options.now), every buffer', async () => {
    await fc.assert(
      fc.asyncProperty(nearEdge, async ({ now, buffer, offset }) => {
        const expiresAt = Math.floor(now) + buffer + offset
        // Out of a Date's range is refused, not decided; and a refresh at the
        // very end of time has no valid result to give: skip those here.
        fc.pre(Math.abs(expiresAt) <= MAX_DATE_MS && Math.abs(now) < MAX_DATE_MS - 1_000)
        // Numbers that can only be epoch seconds are refused, not decided
        // (mistakes.spec.mjs).
        fc.pre(!looksLikeSeconds(expiresAt) && !looksLikeSeconds(now))
        const manager = new TokenManager({ bufferTimeMs: buffer, now: () => now })
        let refreshes = 0
        const refreshFn = () => {
          refreshes++
          return { accessToken: 'new', expiresAt: MAX_DATE_MS }
        }
        const r = await manager.getValidToken('u', { accessToken: 'old', expiresAt }, refreshFn)
        const due = !cores.get(buffer).isFresh(expiresAt, now)
        expect(refreshes).toBe(due ? 1 : 0)
        expect(r.accessToken).toBe(due ? 'new' : 'old')
      }),
      { numRuns: 2_000 },
    )
  })

  it('on the system clock (Date.now as the engine has it)', async () => {
    const buffer = 300_000
    const core = cores.get(buffer)
    const manager = new TokenManager({ bufferTimeMs: buffer })
    let decided = 0
    for (let i = 0; decided < 2_000 && i < 20_000; i++) {
      const before = Date.now()
      const expiresAt = before + buffer + ((i % 5) - 2)
      let refreshed = false
      const r = await manager.getValidToken(`user-${i}`, { accessToken: 'old', expiresAt }, () => {
        refreshed = true
        return { accessToken: 'new', expiresIn: 3600 }
      })
      // Only a call that began and ended in the same millisecond has one "now".
      if (Date.now() !== before) continue
      decided++
      expect(refreshed).toBe(!core.isFresh(expiresAt, before))
      expect(r.accessToken).toBe(refreshed ? 'new' : 'old')
    }
    expect(decided).toBeGreaterThan(100)
  })
})
