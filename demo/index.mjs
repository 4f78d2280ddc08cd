// A short scripted scenario through the addon: 50 concurrent requests for a
// user whose token is about to expire, a lost database write, a failing
// provider. (The full workload demo replaces this with the refreshers issue.)
import { TokenManager } from '../index.mjs'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const manager = new TokenManager({ refreshTimeoutMs: 2_000 })
const db = new Map([['alice', { accessToken: 'alice-v1', refreshToken: 'rt-1', expiresAt: new Date(Date.now() + 60_000) }]])
let providerCalls = 0
const provider = async ({ userId, refreshToken }) => {
  providerCalls++
  await sleep(50)
  const n = Number(refreshToken.split('-')[1]) + 1
  return { accessToken: `${userId}-v${n}`, refreshToken: `rt-${n}`, expiresIn: 3600 }
}

console.log('1) 50 requests arrive together; alice\'s token expires in 60 s (inside the 5 min buffer)')
const row = db.get('alice')
const results = await Promise.all(Array.from({ length: 50 }, () => manager.getValidToken('alice', row, provider)))
const writers = results.filter((r) => r.shouldUpdate)
console.log(`   provider calls: ${providerCalls}; distinct tokens served: ${new Set(results.map((r) => r.accessToken)).size}; callers told to persist: ${writers.length}`)

console.log('2) that write is lost; the next request still reads the old row')
const healed = await manager.getValidToken('alice', row, provider)
console.log(`   got ${healed.accessToken === results[0].accessToken ? 'the new token' : 'a stale token'} with shouldUpdate=${healed.shouldUpdate}; provider calls still ${providerCalls}`)
db.set('alice', { accessToken: healed.accessToken, refreshToken: healed.refreshToken, expiresAt: healed.expiresAt })

console.log('3) the provider is down for bob, whose token still works for 2 minutes')
const down = async () => {
  throw new Error('503 from provider')
}
const bob = await manager.getValidToken('bob', { accessToken: 'bob-v1', expiresAt: new Date(Date.now() + 120_000) }, down)
console.log(`   bob keeps his own token (${bob.accessToken === 'bob-v1' ? 'yes' : 'no'}), shouldUpdate=${bob.shouldUpdate}`)
const carol = await manager.getValidToken('carol', { accessToken: 'carol-v1', expiresAt: new Date(0) }, down).catch((e) => e)
console.log(`   carol's token had expired: ${carol.name} ${carol.code}`)

console.log('stats:', manager.stats())
