// Rows 8, 8b and 9: `getToken` (the manager keeps the token: options
// `store` and `refresher`) beside what an app does without it, on tokens
// held and fresh, for the same users.
// - 8, 8b: `getToken` against `getValidToken`'s hot path, each user's
//   fresh token presented by the caller (as rows 1 and 2, over many users).
// - 9: the app code a `getValidToken` user writes (load the row from the
//   store, `getValidToken`, persist on `shouldUpdate`), with this package and
//   with the seed, against `getToken` with the same in-memory store.
import { awaitedNsPerCall, concurrentCallsPerSec } from './harness.mjs'
import { fakeToken, seed } from './competitors.mjs'
import { TokenManager } from '../index.mjs'

const HOUR = 3_600_000
const USERS = 1000
const IN_FLIGHT = 1000

const fmtInt = (v) => (Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : '—')
const noRefresh = () => Promise.reject(new Error('a fresh token must not refresh'))

/** The app's table in memory: one row per user, tokens valid for an hour. */
function memoryTable(users, tokenBytes) {
  const rows = new Map()
  const expiresAt = new Date(Date.now() + HOUR)
  for (let i = 0; i < users; i++) rows.set(`user-${i}`, { accessToken: fakeToken(`a${i}`, tokenBytes), refreshToken: fakeToken(`r${i}`, 64), expiresAt })
  return {
    rows,
    load: (userId) => rows.get(userId) ?? null,
    save(userId, token, previous) {
      const row = rows.get(userId)
      if ((row?.accessToken ?? null) !== (previous?.accessToken ?? null)) return false
      rows.set(userId, { accessToken: token.accessToken, refreshToken: token.refreshToken, expiresAt: token.expiresAt })
      return true
    },
  }
}

/** A manager with `store` and `refresher`, holding every user's token (one `getToken` each). */
async function keeper(store, users) {
  const m = new TokenManager({ store, refresher: noRefresh })
  for (let i = 0; i < users; i++) await m.getToken(`user-${i}`)
  return m
}

/** The seed-style app code around a `getValidToken`: load, call, persist on shouldUpdate (compiled per use, as `cycling`). */
const APP_CODE = `return async (userId) => {
  const row = await store.load(userId)
  const token = await manager.getValidToken(userId, row, refreshFn)
  if (token.shouldUpdate) {
    await store.save(userId, { accessToken: token.accessToken, refreshToken: token.refreshToken ?? row.refreshToken, expiresAt: token.expiresAt }, row)
  }
  return token
}`
const appCode = (manager, store, refreshFn) => new Function('manager', 'store', 'refreshFn', APP_CODE)(manager, store, refreshFn)
const CYCLE = 'let i = 0; const n = ids.length; return () => { const id = ids[i]; i = i === n - 1 ? 0 : i + 1; return call(id) }'

/**
 * @param {{ tokenBytes: number, microRounds: number }} ctx
 * @returns {import('./harness.mjs').Row[]}
 */
export function lifecycleRows(ctx) {
  const ids = Array.from({ length: USERS }, (_, i) => `user-${i}`)
  // Each competitor cycles through the same users with a counter of its
  // own, compiled afresh for each (as harness.mjs's loops: type feedback
  // shared between competitors would time them differently).
  const cycling = (call) => new Function('call', 'ids', CYCLE)(call, ids)
  const hotRow = (id, title, measure, metric) => {
    let table
    let held
    let plain
    return {
      id,
      title: `getToken on a held, fresh token against getValidToken's hot path, ${USERS.toLocaleString('en-US')} users, ${title}`,
      ratio: ['getToken', 'getValidToken'],
      rounds: ctx.microRounds,
      async setup() {
        table = memoryTable(USERS, ctx.tokenBytes)
        held = await keeper(table, USERS)
        plain = new TokenManager()
      },
      async teardown() {
        await held?.close()
        await plain?.close()
      },
      run: {
        getValidToken: async (c) => ({ v: await measure(cycling((u) => plain.getValidToken(u, table.rows.get(u), noRefresh)), c) }),
        getToken: async (c) => ({ v: await measure(cycling((u) => held.getToken(u)), c) }),
      },
      metrics: [metric],
    }
  }
  let table
  let held
  let app
  let seedApp
  return [
    hotRow('8', 'awaited one by one', (call, c) => awaitedNsPerCall(call, 1000, c.bench), {
      key: 'v',
      label: 'ns per call',
      format: fmtInt,
      target: '≤ 1.2×',
      met: ({ ratio }) => ratio <= 1.2,
    }),
    hotRow('8b', `${IN_FLIGHT.toLocaleString('en-US')} in flight`, (call, c) => concurrentCallsPerSec(call, IN_FLIGHT, c.bench), {
      key: 'v',
      label: 'calls/s',
      format: fmtInt,
      // 1.2× the time per call is 1/1.2 of the rate.
      target: '≥ 0.83×',
      met: ({ ratio }) => ratio >= 1 / 1.2,
    }),
    {
      id: '9',
      title: `app code (load the row, getValidToken, persist on shouldUpdate) against getToken, same in-memory store, ${USERS.toLocaleString('en-US')} users, fresh tokens, ${IN_FLIGHT.toLocaleString('en-US')} in flight`,
      ratio: ['getToken', 'app code'],
      rounds: ctx.microRounds,
      async setup() {
        table = memoryTable(USERS, ctx.tokenBytes)
        held = await keeper(table, USERS)
        app = appCode(new TokenManager(), table, noRefresh)
        seedApp = appCode(seed(), table, noRefresh)
      },
      async teardown() {
        await held?.close()
      },
      run: {
        seed: async (c) => ({ v: await concurrentCallsPerSec(cycling(seedApp), IN_FLIGHT, c.bench) }),
        'app code': async (c) => ({ v: await concurrentCallsPerSec(cycling(app), IN_FLIGHT, c.bench) }),
        getToken: async (c) => ({ v: await concurrentCallsPerSec(cycling((u) => held.getToken(u)), IN_FLIGHT, c.bench) }),
      },
      metrics: [{ key: 'v', label: 'calls/s', format: fmtInt }],
    },
  ]
}
