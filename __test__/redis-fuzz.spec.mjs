// What someone with write access to Redis can put in a user's record or on
// the channel, fed through the entry points production uses (getValidToken
// on TokenManagers sharing a Redis): fast-check mutates genuine records and
// notices. Nothing throws but a TokenRefreshError with a stable code, no
// forged value is handed out, no forged notice fails a waiting caller or
// invalidates a held token, and every forged notice is dropped and counted.
import { createHash } from 'node:crypto'
import { createRequire } from 'node:module'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import fc from 'fast-check'

import { TokenManager, TokenRefreshError } from '../index.mjs'
import { captureChannel, publish, rawClient } from './helpers/raw-redis.mjs'
import { newKey, sleep, startRedis } from './helpers/redis.mjs'

const CODES = new Set(createRequire(import.meta.url)('../binding.js').errorCodes())
const MIN = 60_000
const hashOf = (user) => createHash('sha256').update(user).digest('hex')
const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })
const deferred = () => {
  let resolve
  let reject
  const promise = new Promise((a, b) => ((resolve = a), (reject = b)))
  return { promise, resolve, reject }
}

let redis
let raw
let key
const managers = []
/** Everything any manager logged, as one list: it must never hold a token. */
const logged = []
const logger = { warn: (fields, message) => logged.push({ fields, message }), error: (fields, message) => logged.push({ fields, message }) }
function instance(prefix, encryptionKey = key) {
  const m = new TokenManager({ bufferTimeMs: MIN, logger, redis: { url: redis.url, encryptionKey, keyPrefix: prefix } })
  managers.push(m)
  return m
}
/** A refresh function whose tokens name `tag`; `issued` holds every token it made. */
function refresher(tag) {
  const issued = []
  const seen = []
  const fn = async (ctx) => {
    seen.push(ctx.refreshToken)
    const n = `${tag}-${ctx.userId}-${issued.length}-${Math.random().toString(36).slice(2)}`
    issued.push(`at-${n}`, `rt-${n}`)
    return { accessToken: `at-${n}`, refreshToken: `rt-${n}`, expiresIn: 3600 }
  }
  return Object.assign(fn, { issued, seen })
}
/** Settles `p` into { ok, value } or { ok: false, error }. */
const settle = (p) => p.then((value) => ({ ok: true, value }), (error) => ({ ok: false, error }))
/** A rejection is a TokenRefreshError with one of the core's codes. */
function expectTyped(error) {
  expect(error).toBeInstanceOf(TokenRefreshError)
  expect(CODES.has(error.code)).toBe(true)
}
function resources() {
  const counts = {}
  for (const r of process.getActiveResourcesInfo()) counts[r] = (counts[r] ?? 0) + 1
  return counts
}
const total = (counts) => Object.values(counts).reduce((a, b) => a + b, 0)

beforeAll(async () => {
  redis = await startRedis()
  raw = await rawClient(redis.port)
  key = newKey()
})
afterAll(async () => {
  await Promise.all(managers.splice(0).map((m) => m.close()))
  raw?.close()
  await redis?.stop()
})

// ---------------------------------------------------------------- records

const FIELDS = ['t', 'e', 'w', 'f', 'n', 'h', 'x']
/** Values a number field may be garbled into. */
const ODD = ['', '-1', '0', '-0', '1.5', 'abc', 'NaN', 'nan', 'inf', '-inf', '1e308', '1e999', '-1e999', '0x10', ' 12', '12 ', '9'.repeat(40), String(2 ** 53 + 1),
  '9223372036854775807', '9223372036854775808', '-9223372036854775808', '18446744073709551615', '18446744073709551616', '\u0000', '1\u00002']
const bytes = (max) => fc.uint8Array({ maxLength: max }).map((b) => Buffer.from(b))

/**
 * One change to U's record (`u`) and V's (`v`), maps of field to Buffer;
 * a record may also become a key of another type.
 */
const change = fc.oneof(
  fc.record({ kind: fc.constant('flip'), field: fc.constantFrom(...FIELDS), at: fc.nat(), bits: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('truncate'), field: fc.constantFrom(...FIELDS), n: fc.nat() }),
  fc.record({ kind: fc.constant('extend'), field: fc.constantFrom(...FIELDS), tail: bytes(64) }),
  fc.record({ kind: fc.constant('swap'), field: fc.constantFrom(...FIELDS) }),
  fc.record({ kind: fc.constant('swapAll') }),
  fc.record({ kind: fc.constant('set'), field: fc.constantFrom(...FIELDS), value: fc.oneof(fc.constantFrom(...ODD).map((s) => Buffer.from(s)), bytes(300)) }),
  fc.record({ kind: fc.constant('shift'), field: fc.constantFrom('e', 'w', 'f', 'n', 'x'), by: fc.oneof(fc.integer({ min: -5, max: 5 }), fc.integer({ min: -4e6, max: 4e6 })) }),
  fc.record({ kind: fc.constant('huge'), field: fc.constantFrom(...FIELDS), size: fc.constantFrom(70_000, 140_000, 300_000) }),
  fc.record({ kind: fc.constant('delete'), field: fc.constantFrom(...FIELDS) }),
  fc.record({ kind: fc.constant('mark') }),
  fc.record({ kind: fc.constant('type'), as: fc.constantFrom('string', 'list', 'set') }),
)

function apply(changes, u, v) {
  let type = 'hash'
  for (const c of changes) {
    const f = c.field
    if (c.kind === 'flip') {
      const b = Buffer.from(u[f] ?? Buffer.from([0]))
      if (b.length === 0) u[f] = Buffer.from([c.bits])
      else {
        b[c.at % b.length] ^= c.bits
        u[f] = b
      }
    } else if (c.kind === 'truncate') u[f] = (u[f] ?? Buffer.alloc(0)).subarray(0, c.n % ((u[f]?.length ?? 0) + 1))
    else if (c.kind === 'extend') u[f] = Buffer.concat([u[f] ?? Buffer.alloc(0), c.tail])
    else if (c.kind === 'swap') [u[f], v[f]] = [v[f], u[f]]
    else if (c.kind === 'swapAll') {
      const [a, b] = [{ ...u }, { ...v }]
      for (const k of FIELDS) [u[k], v[k]] = [b[k], a[k]]
    } else if (c.kind === 'set') u[f] = c.value
    else if (c.kind === 'shift') u[f] = Buffer.from(String(Number(u[f] ?? 0) + c.by))
    else if (c.kind === 'huge') u[f] = Buffer.alloc(c.size, f === 't' ? 0x41 : 0x39)
    else if (c.kind === 'delete') delete u[f]
    else if (c.kind === 'mark' && u.f !== undefined) u.x = u.f
    else if (c.kind === 'type') type = c.as
    for (const k of FIELDS) if (u[k] === undefined) delete u[k]
    for (const k of FIELDS) if (v[k] === undefined) delete v[k]
  }
  return type
}

async function readRecord(prefix, user) {
  const flat = await raw.send('HGETALL', `${prefix}tok:{${hashOf(user)}}`)
  const r = {}
  for (let i = 0; i < flat.length; i += 2) r[flat[i].toString()] = flat[i + 1]
  return r
}
async function writeRecord(prefix, user, record, type = 'hash') {
  const k = `${prefix}tok:{${hashOf(user)}}`
  await raw.send('DEL', k)
  const pairs = Object.entries(record).flat()
  if (type === 'string') await raw.send('SET', k, record.t ?? 'x')
  else if (type === 'list') await raw.send('RPUSH', k, ...(pairs.length ? pairs : ['x']))
  else if (type === 'set') await raw.send('SADD', k, ...(pairs.length ? pairs : ['x']))
  else if (pairs.length > 0) await raw.send('HSET', k, ...pairs)
}

describe('records garbled in Redis (fast-check)', () => {
  it('a getValidToken over any mutation of genuine records: a typed error or a genuine token, never a forged one; no token logged; nothing leaks', async () => {
    const prefix = 'recfuzz:'
    const writer = instance(prefix)
    const reader = instance(prefix)
    const written = refresher('writer')
    const refresh = refresher('reader')
    const errors = {}
    const answers = { genuine: 0, refreshed: 0 }
    let run = 0
    let deadline = Infinity
    const property = async (changes) => {
      // Time-aware: past the budget the remaining runs pass without work
      // (fast-check's own time limit would abandon a call in flight).
      if (Date.now() > deadline) return
      const [u, v] = [`rec-${++run}-u`, `rec-${run}-v`]
      const genuine = {}
      for (const user of [u, v]) genuine[user] = await writer.getValidToken(user, expired(user), written)
      const records = { [u]: await readRecord(prefix, u), [v]: await readRecord(prefix, v) }
      expect(Object.keys(records[u]).sort()).toEqual(['e', 'f', 'h', 'n', 't', 'w'])
      const type = apply(changes, records[u], records[v])
      await writeRecord(prefix, u, records[u], type)
      await writeRecord(prefix, v, records[v])
      for (const user of [u, v]) {
        const before = refresh.issued.length
        const seenBefore = refresh.seen.length
        const got = await settle(reader.getValidToken(user, expired(user), refresh))
        const produced = refresh.issued.slice(before)
        if (!got.ok) {
          expectTyped(got.error)
          errors[got.error.code] = (errors[got.error.code] ?? 0) + 1
          continue
        }
        const t = got.value
        // The genuine record's token, or one this call's refresh produced.
        if (t.accessToken === genuine[user].accessToken) {
          answers.genuine++
          expect(produced).toEqual([])
          // A token marked bad (its fence in `x`) is never handed out.
          if (user === u && changes.every((c) => c.kind === 'mark')) expect.fail('a token marked bad was handed out')
        } else {
          answers.refreshed++
          expect(produced).toContain(t.accessToken)
          if (t.refreshToken != null) expect(produced).toContain(t.refreshToken)
        }
        expect(t.expiresAt).toBeInstanceOf(Date)
        expect(Number.isNaN(t.expiresAt.getTime())).toBe(false)
        // The refresh ran with the caller's refresh token or the genuine
        // record's, never one from another user's record or the mutation.
        for (const r of refresh.seen.slice(seenBefore)) expect([`r0-${user}`, genuine[user].refreshToken]).toContain(r)
      }
      // No lock is left behind: the next refresh of either user is not held up.
      expect(await raw.send('EXISTS', `${prefix}lock:{${hashOf(u)}}`, `${prefix}lock:{${hashOf(v)}}`)).toBe(0)
    }
    // Warm up (the first lock grant on a new server may wait out the
    // restart guard), then measure what the runs leave behind.
    await property([{ kind: 'mark' }])
    await sleep(50)
    const resourcesBefore = resources()
    const heapBefore = process.memoryUsage().heapUsed
    deadline = Date.now() + 20_000
    await fc.assert(fc.asyncProperty(fc.array(change, { minLength: 1, maxLength: 3 }), property), { numRuns: 200 })
    await sleep(50)
    const resourcesAfter = resources()
    // Every run refreshed or shared; handles and heap stay flat.
    expect(total(resourcesAfter)).toBeLessThanOrEqual(total(resourcesBefore) + 2)
    expect(process.memoryUsage().heapUsed - heapBefore).toBeLessThan(64 * 1024 * 1024)
    expect(reader.stats().inFlight).toBe(0)
    // A garbled record is that user's cache miss, not an error.
    expect(errors).toEqual({})
    expect(answers.refreshed).toBeGreaterThan(0)
    expect(answers.genuine).toBeGreaterThan(0)
    const tokens = [...written.issued, ...refresh.issued]
    const text = JSON.stringify(logged)
    for (const token of tokens) expect(text).not.toContain(token)
  }, 60_000)
})

// ---------------------------------------------------------------- notices

/** The hashed id a notice names its user by (its first 64 bytes). */
const idOf = (m) => m.toString('latin1', 0, 64)
const kindOf = (m) => m.toString('latin1', 64, 67)

/**
 * A recipe for one message, made into bytes at run time from the notices
 * captured so far (`from` picks one): sent as is (a replay, or one of the
 * waiting user's own earlier notices), with bits
 * flipped, cut, joined to another, retargeted at the waiting user,
 * oversized, or random bytes.
 */
const recipe = fc.oneof(
  fc.record({ kind: fc.constant('replay'), from: fc.nat() }),
  fc.record({ kind: fc.constant('own'), from: fc.nat() }),
  fc.record({ kind: fc.constant('flip'), from: fc.nat(), at: fc.nat(), bits: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('truncate'), from: fc.nat(), n: fc.nat() }),
  fc.record({ kind: fc.constant('concat'), from: fc.nat(), other: fc.nat() }),
  fc.record({ kind: fc.constant('tail'), from: fc.nat(), tail: bytes(64) }),
  fc.record({ kind: fc.constant('retarget'), from: fc.nat() }),
  fc.record({ kind: fc.constant('oversize'), from: fc.nat(), size: fc.constantFrom(140_000, 300_000) }),
  fc.record({ kind: fc.constant('random'), bytes: bytes(400) }),
)

function make(r, corpus, target) {
  const pick = (i) => corpus[i % corpus.length]
  const m = r.from === undefined ? null : Buffer.from(pick(r.from))
  switch (r.kind) {
    case 'replay':
      return m
    case 'own': {
      // One of the waiting user's earlier notices, in any prefix.
      const own = corpus.filter((x) => idOf(x) === target)
      return own.length === 0 ? m : Buffer.from(own[r.from % own.length])
    }
    case 'flip':
      m[r.at % m.length] ^= r.bits
      return m
    case 'truncate':
      return m.subarray(0, r.n % m.length)
    case 'concat':
      return Buffer.concat([m, pick(r.other)])
    case 'tail':
      return Buffer.concat([m, r.tail])
    case 'retarget':
      m.write(target, 0, 'latin1')
      return m
    case 'oversize':
      return Buffer.concat([m, Buffer.alloc(r.size, 0x7c)])
    default:
      return r.bytes
  }
}

describe('notices forged, mutated or replayed on the channel (fast-check)', () => {
  it('a waiting caller gets its holder’s outcome, a held token is not invalidated, every forged notice is dropped and counted', async () => {
    const [P, Q, R] = ['ntcfuzz:', 'ntcother:', 'ntckey:']
    // In P: A leads the refreshes B waits on; C and D make each waiting
    // user's history (a failed refresh, a commit). Q: another prefix, same
    // key. R: another prefix and key.
    const [a, b, c, d] = [instance(P), instance(P), instance(P), instance(P)]
    const q = instance(Q)
    const r = instance(R, newKey())
    const captures = await Promise.all([P, Q, R].map((p) => captureChannel(redis.port, `${p}refreshed`)))
    const fail = async () => Promise.reject(new Error('refused'))
    const mine = refresher('b')
    const theirs = refresher('others')
    try {
      // A token B holds (the hot path), invalidated once for real from A:
      // the genuine invalidation is then captured for replays.
      const hot = 'hot-user'
      const first = await b.getValidToken(hot, expired(hot), mine)
      await a.invalidate(hot)
      await sleep(100)
      let held = await b.getValidToken(hot, { ...first }, mine)
      expect(mine.issued).toHaveLength(4)
      held = { accessToken: held.accessToken, refreshToken: held.refreshToken, expiresAt: held.expiresAt }
      // The others' genuine notices: the same user invalidated in Q and R.
      for (const m of [q, r]) {
        await m.getValidToken(hot, expired(hot), theirs)
        await m.invalidate(hot)
      }
      // A released notice: D's commit fenced out by a newer fence.
      const gate = deferred()
      const released = d.getValidToken('released-user', expired('released-user'), () => gate.promise)
      await sleep(50)
      await raw.send('HSET', `${P}tok:{${hashOf('released-user')}}`, 'f', '1000000000000000')
      gate.resolve({ accessToken: 'at-released', refreshToken: 'rt-released', expiresIn: 3600 })
      await settle(released)
      await sleep(100)
      for (const [i, kind] of [[0, '|I|'], [0, '|R'], [1, '|I|'], [2, '|I|']]) expect(captures[i].messages.some((m) => kindOf(m).startsWith(kind))).toBe(true)

      // What the test publishes on P is captured too: never genuine.
      const sent = new Set()
      const genuineP = () => new Set(captures[0].messages.map((m) => m.toString('hex')).filter((m) => !sent.has(m) && kindOf(Buffer.from(m, 'hex')) !== '|I|'))
      const corpus = () => captures.flatMap((c) => c.messages)
      let run = 0
      let expectedDrops = 0
      let published = 0
      const outcomes = { committed: 0, failed: 0 }
      const dropsBefore = b.stats().redisNoticesDropped
      const deadline = Date.now() + 15_000
      const property = async (recipes, commits) => {
        if (Date.now() > deadline) return
        const w = `wait-${++run}`
        // Its history: a failed refresh (C), then a commit (D), marked bad
        // as invalidate would (so the next refresh leads); and one in Q.
        await settle(c.getValidToken(w, expired(w), fail))
        // (C's caller may be answered before its unlock lands: D may wait on it and fail too.)
        for (let i = 0; i < 5 && !(await settle(d.getValidToken(w, expired(w), theirs))).ok; i++) await sleep(20)
        const record = `${P}tok:{${hashOf(w)}}`
        await raw.send('HSET', record, 'x', await raw.send('HGET', record, 'f'))
        await q.getValidToken(w, expired(w), theirs)
        await sleep(20)
        const gate = deferred()
        const leading = settle(a.getValidToken(w, expired(w), () => gate.promise))
        for (let i = 0; i < 100 && (await raw.send('EXISTS', `${P}lock:{${hashOf(w)}}`)) === 0; i++) await sleep(5)
        const calls = mine.seen.length
        const waiting = settle(b.getValidToken(w, expired(w), mine))
        await sleep(30)
        const all = corpus()
        const messages = recipes.map((x) => make(x, all, hashOf(w)))
        const genuine = genuineP()
        expectedDrops += messages.filter((m) => !genuine.has(m.toString('hex'))).length
        published += messages.length
        for (const m of messages) if (!genuine.has(m.toString('hex'))) sent.add(m.toString('hex'))
        await publish(redis.port, `${P}refreshed`, messages)
        await sleep(20)
        const token = `at-a-${w}-${Math.random()}`
        if (commits) gate.resolve({ accessToken: token, refreshToken: `rt-a-${w}`, expiresIn: 3600 })
        else gate.reject(new Error('refused'))
        const [led, waited] = await Promise.all([leading, waiting])
        // The genuine outcome, as the leader's own caller got it.
        if (commits) {
          outcomes.committed++
          expect(led.ok && led.value.accessToken).toBe(token)
          expect(waited.ok && waited.value.accessToken).toBe(token)
        } else {
          outcomes.failed++
          expect(led.ok).toBe(false)
          expect(waited.ok).toBe(false)
          expectTyped(waited.error)
          expect(waited.error.code).toBe(led.error.code)
        }
        expect(mine.seen.length).toBe(calls)
      }
      await fc.assert(fc.asyncProperty(fc.array(recipe, { minLength: 1, maxLength: 30 }), fc.boolean(), property), { numRuns: 80 })
      // Both outcomes were waited on, under fire.
      expect(outcomes.committed).toBeGreaterThan(0)
      expect(outcomes.failed).toBeGreaterThan(0)
      expect(expectedDrops).toBeGreaterThan(0)
      expect(published).toBeGreaterThan(expectedDrops)
      // Every message not byte for byte a genuine notice of P is dropped,
      // and counted once.
      for (let i = 0; i < 100 && b.stats().redisNoticesDropped - dropsBefore < expectedDrops; i++) await sleep(20)
      await sleep(50)
      expect(b.stats().redisNoticesDropped - dropsBefore).toBe(expectedDrops)
      // The held token is still B's: no forged or replayed invalidation reached it.
      const again = await b.getValidToken(hot, held, mine)
      expect(again).toMatchObject({ accessToken: held.accessToken, shouldUpdate: false })
      expect(mine.issued).toHaveLength(4)
      const tokens = [...mine.issued, ...theirs.issued]
      const text = JSON.stringify(logged)
      for (const t of tokens) expect(text).not.toContain(t)
    } finally {
      for (const c of captures) c.close()
    }
  }, 60_000)
})
