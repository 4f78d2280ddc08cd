// Idle users are dropped a few at a time, by a background task when no call
// comes, and stats() counts stay true throughout. Counts, not timings: the
// waits below only bound how long the test may take.
import { describe, expect, it } from 'vitest'

import { TokenManager } from '../index.mjs'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const HOUR = 3_600_000

/** Polls `fn` every 50 ms until it holds; false if `deadline` (epoch ms) passes first. */
async function until(fn, deadline) {
  while (!fn()) {
    if (Date.now() > deadline) return false
    await sleep(50)
  }
  return true
}

describe('eviction', () => {
  it('drops 200,000 idle users with no call for them, keeping active users and refreshes in flight', { timeout: 90_000 }, async () => {
    const idleTtlMs = 8_000
    const users = 200_000
    const m = new TokenManager({ idleTtlMs, refreshTimeoutMs: 120_000 })
    const stale = { accessToken: 'old', refreshToken: 'rt', expiresAt: new Date(Date.now() - 1000) }
    const later = new Date(Date.now() + HOUR)
    const started = Date.now()
    const refreshFn = async () => ({ accessToken: 'new', refreshToken: 'rt2', expiresAt: later })
    for (let b = 0; b < users; b += 1000) {
      const ps = []
      for (let i = b; i < b + 1000; i++) ps.push(m.getValidToken(`user-${i}`, stale, refreshFn))
      await Promise.all(ps)
    }
    // 100 users who come back, and one whose refresh is still running.
    for (let i = 0; i < 100; i++) await m.getValidToken(`keep-${i}`, stale, refreshFn)
    let release
    const held = new Promise((r) => (release = r))
    const busy = m.getValidToken('busy', stale, () => held)
    const filledAt = Date.now()
    if (filledAt - started < idleTtlMs) {
      // Only meaningful if none has gone idle yet (filling took less than idleTtlMs).
      expect(m.stats()).toMatchObject({ users: users + 101, refreshes: users + 100, inFlight: 1 })
    }

    // Halfway through, the 100 come back (handed the token they were
    // refreshed, a hit each): they stay, everyone else goes idle.
    await sleep(idleTtlMs / 2)
    for (let i = 0; i < 100; i++) {
      const r = await m.getValidToken(`keep-${i}`, stale, refreshFn)
      expect(r).toMatchObject({ accessToken: 'new', shouldUpdate: true })
    }
    const keptUntil = Date.now() + idleTtlMs
    // Nothing calls for the 200,000: the background task drops them, soon
    // after idleTtlMs (stats() itself evicts at most 64 entries a call).
    expect(await until(() => m.stats().users <= 101, keptUntil - 500)).toBe(true)
    expect(Date.now()).toBeLessThan(keptUntil)
    expect(m.stats()).toMatchObject({ users: 101, inFlight: 1, refreshes: users + 100, hits: 100, failures: 0 })

    // Then the 100 go idle too; the refresh in flight is never evicted.
    expect(await until(() => m.stats().users <= 1, keptUntil + 5_000)).toBe(true)
    expect(m.stats()).toMatchObject({ users: 1, inFlight: 1 })
    release({ accessToken: 'busy-new', expiresAt: later })
    expect(await busy).toMatchObject({ accessToken: 'busy-new', shouldUpdate: true })
    expect(m.stats()).toMatchObject({ users: 1, inFlight: 0, refreshes: users + 101 })

    // An evicted user is a new one again: its next due token is refreshed.
    let runs = 0
    const again = await m.getValidToken('user-0', stale, async () => {
      runs++
      return { accessToken: 'newer', expiresAt: later }
    })
    expect(again).toMatchObject({ accessToken: 'newer', shouldUpdate: true })
    expect(runs).toBe(1)
    expect(m.stats()).toMatchObject({ users: 2, refreshes: users + 102 })
  })
})
