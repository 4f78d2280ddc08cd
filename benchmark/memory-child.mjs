// Row 5, one competitor per process: resident bytes per user after `users`
// distinct users were each refreshed once. Prints one JSON line.
// Usage: node --expose-gc --import tsx memory-child.mjs <seed|addon|floor> <users> <tokenBytes>
import { setImmediate as tick } from 'node:timers/promises'
import { seed, addon, floorRefresh, fakeToken } from './competitors.mjs'

const [name, usersArg, bytesArg] = process.argv.slice(2)
const users = Number(usersArg)
const tokenBytes = Number(bytesArg)
const make = { seed, addon, floor: () => ({ getValidToken: floorRefresh }) }[name]
if (!make || !(users > 0) || !(tokenBytes > 0) || typeof globalThis.gc !== 'function') {
  console.error('usage: node --expose-gc --import tsx memory-child.mjs <seed|addon|floor> <users> <tokenBytes>')
  process.exit(2)
}

const later = new Date(Date.now() + 3_600_000)
const REFRESH_TOKEN_BYTES = 64
const presented = { accessToken: fakeToken('old', tokenBytes), refreshToken: fakeToken('rt-old', 64), expiresAt: new Date(Date.now() - 1000) }

// Every user gets its own new tokens, as a provider would issue them.
async function fill(m, from, to) {
  for (let b = from; b < to; b += 1000) {
    const ps = []
    for (let i = b; i < Math.min(b + 1000, to); i++) {
      const refreshed = { accessToken: fakeToken(`a${i}`, tokenBytes), refreshToken: fakeToken(`r${i}`, REFRESH_TOKEN_BYTES), expiresAt: later }
      ps.push(m.getValidToken(`user-${i}`, presented, async () => refreshed))
    }
    await Promise.all(ps)
  }
}

async function settle() {
  for (let i = 0; i < 4; i++) {
    globalThis.gc()
    await tick()
  }
}

// Warm up on a throwaway instance, enough to grow V8's young generation to
// its working size: JIT code and heap headroom belong in the baseline.
await fill(make(), 0, 20_000)
await settle()
const before = process.memoryUsage()
const m = make()
await fill(m, 0, users)
await settle()
const after = process.memoryUsage()
globalThis.keepAlive = m
const rssPerUser = (after.rss - before.rss) / users
// What each competitor keeps of a user's tokens: the addon holds the
// refreshed access and refresh token (for lost-write healing and joiners);
// the seed and the floor hold none.
const tokenBytesHeld = name === 'addon' ? tokenBytes + REFRESH_TOKEN_BYTES : 0
console.log(
  JSON.stringify({
    rssPerUser,
    overheadPerUser: rssPerUser - tokenBytesHeld,
    heapPerUser: (after.heapUsed - before.heapUsed) / users,
  }),
)
