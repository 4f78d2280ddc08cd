// The wire protocol between lib/protocol.js and src/binding/protocol.rs:
// every answer the engine's bound functions give, produced by the real
// encoders (a BindingManager's engine, driven into each state) and read
// back by the one decoder. A new variant on either side fails here.
import { createRequire } from 'node:module'
import { describe, expect, it } from 'vitest'

const require = createRequire(import.meta.url)
const { BindingManager } = require('../binding.js')
const { bindProtocol, decodeIssued, decodePlan } = require('../lib/protocol.js')

const HOUR = 3_600_000
const BUFFER = 300_000

function engine() {
  const native = new BindingManager({})
  return { native, raw: native.bindProtocol(), decoded: bindProtocol(native) }
}

describe('begin answers, encoded and decoded', () => {
  it('null: the presented token is good', () => {
    const { raw, decoded } = engine()
    const exp = Date.now() + HOUR
    expect(raw.begin('u', 'a', null, exp)).toBeNull()
    expect(decoded.begin('u', 'a', null, exp)).toEqual({ kind: 'presented' })
  })

  it('n >= 0 then n < 0: lead with the presented refresh token, then join that flight', () => {
    const { raw, decoded } = engine()
    const due = Date.now() + 1_000
    const lead = raw.begin('u', 'a', 'r0', due)
    expect(typeof lead === 'number' && lead >= 0).toBe(true)
    expect(decodePlan(lead, 'r0')).toEqual({ kind: 'lead', flightId: lead, refreshToken: 'r0' })
    const join = raw.begin('u', 'a', 'r0', due)
    expect(typeof join === 'number' && join < 0).toBe(true)
    expect(decodePlan(join, 'r0')).toEqual({ kind: 'join', flightId: lead })
    expect(decoded.begin('u', 'a', 'r0', due)).toEqual({ kind: 'join', flightId: lead })
  })

  it("{ kind: 'held' }: a token a refresh produced beats an older presented one", () => {
    const { raw, decoded } = engine()
    const now = Date.now()
    const { flightId } = decoded.begin('u', 'old', 'r0', now + 1_000)
    const issued = decoded.complete('u', flightId, 'new', 'r1', now + HOUR, null)
    expect(issued).toEqual({ accessToken: 'new', refreshToken: 'r1', expiresAtMs: now + HOUR, shouldUpdate: true })
    const held = raw.begin('u', 'old', 'r0', now + 1_000)
    expect(held).toMatchObject({ kind: 'held', accessToken: 'new', refreshToken: 'r1', expiresAtMs: now + HOUR, shouldUpdate: true })
    expect(decodePlan(held, 'r0')).toEqual({
      kind: 'held',
      token: { accessToken: 'new', refreshToken: 'r1', expiresAtMs: now + HOUR, shouldUpdate: true },
    })
    // The caller presenting the held token itself is not told to update.
    expect(decoded.begin('u', 'new', null, now + BUFFER)).toEqual({
      kind: 'held',
      token: { accessToken: 'new', refreshToken: null, expiresAtMs: now + HOUR, shouldUpdate: false },
    })
  })

  it("{ kind: 'lead' }: lead with a newer refresh token the engine holds", () => {
    const native = new BindingManager({ doubleCheckWindowMs: 0, bufferTimeMs: 0 })
    const p = bindProtocol(native)
    const raw = native.bindProtocol()
    const now = Date.now()
    const first = p.begin('u', 'a0', 'r0', now - 1)
    // Rotated: the engine now holds r1, about to expire.
    p.complete('u', first.flightId, 'a1', 'r1', now + 50, null)
    return new Promise((resolve) => setTimeout(resolve, 60)).then(() => {
      const answer = raw.begin('u', 'a0', 'r0', now - 1)
      expect(answer).toMatchObject({ kind: 'lead', refreshToken: 'r1' })
      expect(decodePlan(answer, 'r0')).toEqual({ kind: 'lead', flightId: answer.flightId, refreshToken: 'r1' })
    })
  })
})

describe('complete answers, encoded and decoded', () => {
  it('e > 0: rotated, the caller is handed the refresh token; e < 0: kept, none handed', () => {
    const { raw } = engine()
    const now = Date.now()
    const a = raw.begin('u', 'a', 'r0', now + 1_000)
    const rotated = raw.complete('u', a, 'b', 'r1', now + HOUR, null)
    expect(rotated).toBe(now + HOUR)
    expect(decodeIssued(rotated, 'b', 'r1')).toEqual({ accessToken: 'b', refreshToken: 'r1', expiresAtMs: now + HOUR, shouldUpdate: true })
    const v = raw.begin('v', 'a', 'r0', now + 1_000)
    const kept = raw.complete('v', v, 'b', null, now + HOUR, null)
    expect(kept).toBe(-(now + HOUR))
    expect(decodeIssued(kept, 'b', null)).toEqual({ accessToken: 'b', refreshToken: null, expiresAtMs: now + HOUR, shouldUpdate: true })
  })

  it('an unusable result throws INVALID_REFRESH_RESULT and ends the flight', () => {
    const { raw } = engine()
    const now = Date.now()
    const id = raw.begin('u', 'a', null, now + 1_000)
    expect(() => raw.complete('u', id, 'b', null, 1e300, null)).toThrow(expect.objectContaining({ code: 'INVALID_REFRESH_RESULT' }))
    expect(raw.begin('u', 'a', null, now + 1_000)).toBeGreaterThanOrEqual(0)
  })
})
