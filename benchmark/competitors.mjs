// The three competitors every row compares, behind one call shape:
// - seed:  the TypeScript port of the design this package replaces.
// - addon: this package, as users load it.
// - floor: the least work a correct answer needs. On the hot path a bare
//   `async () => ({ accessToken, shouldUpdate: false, expiresAt })`; when the
//   token is due it awaits refreshFn once per call (distinct users) or shares
//   one refreshFn promise among all callers of a user (storms). It checks
//   nothing, times nothing out and forgets users: no implementation beats it.
import { SeedTokenManager } from './seed-token-manager.ts'
import { TokenManager } from '../index.mjs'

export const seed = () => new SeedTokenManager()
export const addon = () => new TokenManager()

/** Hot path floor: the bare answer described above, nothing checked. */
export const floorHot = async (userId, token) => ({ accessToken: token.accessToken, shouldUpdate: false, expiresAt: token.expiresAt })

/** Refresh floor for distinct users: one refreshFn call per call, nothing else. */
export const floorRefresh = async (userId, token, refreshFn) => {
  const r = await refreshFn({ userId, refreshToken: token.refreshToken ?? null })
  return { accessToken: r.accessToken, shouldUpdate: true, expiresAt: r.expiresAt, refreshToken: r.refreshToken }
}

/** Storm floor: every caller of a user awaits one shared refreshFn promise. */
export class FloorShared {
  #shared = new Map()
  getValidToken(userId, token, refreshFn) {
    let p = this.#shared.get(userId)
    const leader = p === undefined
    if (leader) {
      p = Promise.resolve(refreshFn({ userId, refreshToken: token.refreshToken ?? null }))
      this.#shared.set(userId, p)
      p.then(
        () => this.#shared.delete(userId),
        () => this.#shared.delete(userId),
      )
    }
    return p.then((r) => ({ accessToken: r.accessToken, shouldUpdate: leader, expiresAt: r.expiresAt }))
  }
}

/** A JWT-shaped token of `bytes` characters (flat, not a rope), distinct per `tag`. */
export function fakeToken(tag, bytes) {
  const head = `eyJhbGciOiJSUzI1NiJ9.${tag}.`
  const s = bytes > head.length ? head + 'x'.repeat(bytes - head.length) : head
  // Flat, as a string parsed from a JSON response is (a concatenation is a rope).
  return JSON.parse(JSON.stringify(s))
}
