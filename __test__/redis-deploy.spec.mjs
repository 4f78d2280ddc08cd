// Redis as production runs it: TLS, ACL credentials, a Redis Cluster,
// invalidate across instances and encryption-key rotation. Every server
// starts here on random loopback ports: certificates are made with openssl,
// the cluster with redis-cli --cluster create.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { inspect } from 'node:util'

import { TokenManager } from '../index.mjs'
import {
  USER_ID_KEY,
  cli,
  freePort,
  makeCertificates,
  makeServerCertificate,
  newKey,
  sleep,
  startCluster,
  startInstance,
  startProvider,
  startRedis,
  startWorker,
  userSlot,
} from './helpers/redis.mjs'

const MIN = 60_000
let seq = 0
const uid = (name = 'user') => `${name}-${++seq}`
const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })
const key = newKey()

function warnings(code) {
  const seen = []
  const on = (w) => w.code === code && seen.push(w.message)
  process.on('warning', on)
  return { seen, off: () => process.off('warning', on) }
}

const managers = []
function manager(redis, options = {}) {
  const m = new TokenManager({ bufferTimeMs: MIN, refreshTimeoutMs: 5_000, ...options, redis: { encryptionKey: key, userIdKey: USER_ID_KEY, ...redis } })
  managers.push(m)
  return m
}
afterEach(async () => {
  await Promise.all(managers.splice(0).map((m) => m.close()))
})

function refresher({ delayMs = 0 } = {}) {
  const fn = vi.fn(async (ctx) => {
    if (delayMs) await sleep(delayMs)
    return { accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 }
  })
  return fn
}

/**
 * `processes` workers × `users` users, each user asked twice at once by
 * every worker, against a provider slow enough that all of them ask while
 * the refresh runs. `redis(i)`: worker i's redis options; `during`: runs
 * once the calls are out. Asserts exactly one refresh per user, no error,
 * no fallback, one caller per user told to persist.
 */
async function storm({ redis, env = () => ({}), processes = 3, users = 20, during = async () => {} }) {
  const provider = await startProvider({ delayMs: 1_500 })
  try {
    const userPrefix = `${uid('storm')}-`
    const workers = Array.from({ length: processes }, (_, i) =>
      startWorker({ key, providerUrl: provider.url, userPrefix, userCount: users, callsPerUser: 2, redis: redis(i) }, { env: env(i) }),
    )
    await Promise.all(workers.map((w) => w.ready))
    workers.forEach((w) => w.go())
    const [done, duringResult] = await Promise.all([Promise.all(workers.map((w) => w.done)), during(provider, userPrefix)])

    const results = done.flatMap((d) => d.results)
    expect(results.filter((r) => r.error)).toEqual([])
    expect(provider.stats).toEqual({ requests: users, refreshes: users, rejected: 0 })
    expect(done.map((d) => d.stats.redisFallbacks)).toEqual(done.map(() => 0))
    for (let i = 0; i < users; i++) {
      const mine = results.filter((r) => r.user === `${userPrefix}${i}`)
      expect(mine).toHaveLength(processes * 2)
      expect(new Set(mine.map((r) => r.accessToken)).size).toBe(1)
      expect(mine.filter((r) => r.shouldUpdate)).toHaveLength(1)
    }
    expect((await Promise.all(workers.map((w) => w.exited))).every((e) => e.code === 0)).toBe(true)
    return { userPrefix, duringResult }
  } finally {
    await provider.close()
  }
}

describe('TLS (rediss://)', () => {
  let certs
  let tls
  beforeAll(async () => {
    certs = await makeCertificates()
    tls = await startRedis(undefined, { tls: certs })
  })
  afterAll(async () => {
    await tls?.stop()
    certs?.remove()
  })

  it('3 processes × 20 users over TLS: exactly one refresh per user (a CA given as tls.ca, or trusted by the system)', async () => {
    await storm({
      // Worker 0 trusts the CA through the system's roots (SSL_CERT_FILE is
      // where rustls-native-certs looks first); the others are given it.
      redis: (i) => (i === 0 ? { url: tls.url } : { url: tls.url, tls: { ca: certs.ca } }),
      env: (i) => (i === 0 ? { SSL_CERT_FILE: certs.caFile } : {}),
    })
  })

  it('a certificate that does not verify is COORDINATOR_UNAVAILABLE (or the local fallback) saying so, at once', async () => {
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    try {
      // Another CA, and the system's roots (which do not hold the test CA); the CA as a Buffer.
      for (const redis of [{ tls: { ca: certs.otherCa } }, {}, { tls: { ca: Buffer.from(certs.otherCa) } }]) {
        const m = manager({ url: tls.url, onError: 'fail', ...redis })
        const user = uid()
        const started = Date.now()
        const error = await m.getValidToken(user, expired(user), refresher()).catch((e) => e)
        expect(error.code).toBe('COORDINATOR_UNAVAILABLE')
        expect(error.message).toMatch(/TLS certificate did not verify \(not issued by a trusted CA\)/)
        expect(Date.now() - started).toBeLessThan(3_000)
      }
      const local = manager({ url: tls.url, tls: { ca: certs.otherCa }, onError: 'local' })
      const user = uid()
      const refreshFn = refresher()
      await expect(local.getValidToken(user, expired(user), refreshFn)).resolves.toMatchObject({ shouldUpdate: true })
      expect(refreshFn).toHaveBeenCalledTimes(1)
      expect(local.stats().redisFallbacks).toBe(1)
      expect(w.seen.at(-1)).toMatch(/certificate did not verify/)
      // With the right CA (a Buffer works too), it coordinates.
      const good = manager({ url: tls.url, tls: { ca: Buffer.from(certs.ca) } })
      await good.getValidToken(user, expired(user), refresher())
      expect(good.stats().redisFallbacks).toBe(0)
    } finally {
      w.off()
    }
  })

  it('a self-signed certificate made with openssl req -x509 (CA:TRUE) works given as tls.ca: pinned', async () => {
    const own = await makeServerCertificate()
    const server = await startRedis(undefined, { tls: own })
    try {
      expect(own.pem).toMatch(/BEGIN CERTIFICATE/)
      for (const ca of [own.pem, Buffer.from(own.pem), `${certs.ca}\n${own.pem}`]) {
        const m = manager({ url: server.url, tls: { ca }, onError: 'fail' })
        const user = uid()
        const refreshFn = refresher()
        await expect(m.getValidToken(user, expired(user), refreshFn)).resolves.toMatchObject({ shouldUpdate: true })
        expect(refreshFn).toHaveBeenCalledTimes(1)
        expect(m.stats().redisFallbacks).toBe(0)
      }
      // The pinned connection comes back after a restart, subscription included.
      const a = manager({ url: server.url, tls: { ca: own.pem } })
      const b = manager({ url: server.url, tls: { ca: own.pem } })
      // Client credentials: no refresh token, so no restart guard applies.
      const plain = () => vi.fn(async () => ({ accessToken: `at-${Math.random()}`, expiresIn: 3600 }))
      await a.getValidToken(uid(), { accessToken: 'cc', expiresAt: 0 }, plain())
      await b.getValidToken(uid(), { accessToken: 'cc', expiresAt: 0 }, plain())
      await server.stop()
      const again = await startRedis(server.port, { tls: own })
      try {
        for (const m of [a, b]) {
          await vi.waitFor(async () => {
            const before = m.stats().redisFallbacks
            const r = await m.getValidToken(uid(), { accessToken: 'cc', expiresAt: 0 }, plain())
            expect(r.shouldUpdate).toBe(true)
            expect(m.stats().redisFallbacks).toBe(before)
          }, { timeout: 10_000, interval: 300 })
        }
        const user = uid()
        const t = await a.getValidToken(user, { accessToken: 'cc', expiresAt: 0 }, plain())
        b.invalidate(user, t.accessToken)
        await vi.waitFor(async () => {
          const refreshFn = plain()
          await a.getValidToken(user, { accessToken: t.accessToken, expiresAt: t.expiresAt }, refreshFn)
          expect(refreshFn).toHaveBeenCalled()
        }, { timeout: 5_000, interval: 100 })
      } finally {
        await again.stop()
      }
    } finally {
      await server.stop().catch(() => {})
      own.remove()
    }
  })

  it('a certificate that does not verify says why: self-signed but not the one given, expired, another host, a CA as the server’s own', async () => {
    const own = await makeServerCertificate()
    const other = await makeServerCertificate()
    const old = await makeServerCertificate({ expired: true })
    const elsewhere = await makeServerCertificate({ san: 'DNS:redis.internal' })
    const caAsServer = await makeServerCertificate({ issuer: certs })
    const servers = []
    try {
      for (const [cert, ca, message] of [
        [own, other.pem, /did not verify \(self-signed, and not the certificate given in redis\.tls\.ca\)/],
        [old, old.pem, /did not verify \(expired\)/],
        [elsewhere, elsewhere.pem, /did not verify \(not issued for this host name: it names redis\.internal\)/],
        [caAsServer, certs.ca, /did not verify \(a CA certificate \(CA:TRUE\) presented as the server's own: give the server one its CA issued \(CA:FALSE\), or give that very certificate as redis\.tls\.ca\)/],
      ]) {
        const server = await startRedis(undefined, { tls: cert })
        servers.push(server)
        const m = manager({ url: server.url, tls: { ca }, onError: 'fail' })
        const user = uid()
        const error = await m.getValidToken(user, expired(user), refresher()).catch((e) => e)
        expect(error.code).toBe('COORDINATOR_UNAVAILABLE')
        expect(error.message).toMatch(message)
      }
    } finally {
      await Promise.all(servers.map((s) => s.stop()))
      for (const c of [own, other, old, elsewhere, caAsServer]) c.remove()
    }
  })

  it('a plaintext URL to the TLS port, or rediss:// to a plaintext port, fails cleanly and fast', async () => {
    const plain = await startRedis()
    try {
      for (const [redis, message] of [
        [{ url: `redis://127.0.0.1:${tls.port}` }, /closed the connection \(is that port TLS-only\? it needs rediss:\/\/\)/],
        // A plaintext server waits for the end of a line a TLS hello never sends: the call's time limit ends it.
        [{ url: `rediss://127.0.0.1:${plain.port}`, tls: { ca: certs.ca } }, /TLS handshake with Redis failed|did not answer in time/],
      ]) {
        const m = manager({ ...redis, onError: 'fail' })
        const user = uid()
        const started = Date.now()
        const error = await m.getValidToken(user, expired(user), refresher()).catch((e) => e)
        expect(error.code).toBe('COORDINATOR_UNAVAILABLE')
        expect(error.message).toMatch(message)
        expect(Date.now() - started).toBeLessThan(3_000)
      }
    } finally {
      await plain.stop()
    }
  })

  it('a Redis Cluster over TLS: 2 processes × 10 users, one refresh per user', async () => {
    const cluster = await startCluster({ masters: 3, tls: certs })
    try {
      expect(cluster.urls.every((u) => u.startsWith('rediss://'))).toBe(true)
      await storm({ redis: () => ({ cluster: cluster.urls, tls: { ca: certs.ca } }), processes: 2, users: 10 })
    } finally {
      await cluster.stop()
    }
  })

  it('refuses tls options it does not honour, at construction', () => {
    for (const [redis, message] of [
      [{ url: tls.url, tls: { insecureSkipVerify: true } }, /tls takes only \{ ca \}/],
      [{ url: tls.url, tls: { ca: 42 } }, /tls.ca must be PEM certificates/],
      [{ url: tls.url, tls: { ca: 'not a certificate' } }, /tls.ca must hold PEM certificates/],
      [{ url: `${tls.url}/#insecure` }, /#insecure/],
      [{ url: 'redis://127.0.0.1:6379', tls: { ca: certs.ca } }, /tls applies to TLS only/],
    ]) {
      expect(() => new TokenManager({ redis: { encryptionKey: key, ...redis } })).toThrow(message)
    }
  })
})

const password = 's3cret-pw!'
// The least an ACL user needs: docs/redis.md lists the same (plus cluster|slots on a cluster).
const acl = ['ttm', 'on', `>${password}`, 'resetchannels', '~ttm:*', '&ttm:*', '-@all', '+hello', '+ping', '+evalsha', '+script|load', '+subscribe', '+publish',
  '+hmget', '+hget', '+hset', '+pttl', '+pexpire', '+set', '+get', '+del', '+info', '+time']

describe('credentials (ACL users and requirepass)', () => {
  let server
  beforeAll(async () => {
    server = await startRedis(undefined, { password: 'admin-pw', args: ['--user', ...acl] })
  })
  afterAll(async () => {
    await server?.stop()
  })

  it('an ACL user with the least rights, and the default user with requirepass, both coordinate', async () => {
    for (const url of [`redis://ttm:${encodeURIComponent(password)}@127.0.0.1:${server.port}`, server.url]) {
      const a = manager({ url, onError: 'fail' })
      const b = manager({ url, onError: 'fail' })
      const user = uid()
      const leading = a.getValidToken(user, expired(user), refresher({ delayMs: 500 }))
      await sleep(100)
      const unused = refresher()
      // b waits on a's lock and takes a's token from the announcement.
      const waited = await b.getValidToken(user, expired(user), unused)
      expect(waited).toMatchObject({ accessToken: (await leading).accessToken, shouldUpdate: false })
      expect(unused).not.toHaveBeenCalled()
      expect(inspect(a, { depth: 10, showHidden: true })).not.toContain(password)
    }
  })

  it('a wrong or missing password is a clear error that never shows the password', async () => {
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    try {
      for (const url of [`redis://ttm:wrong-pw-9@127.0.0.1:${server.port}`, `redis://127.0.0.1:${server.port}`, `redis://:wrong-pw-9@127.0.0.1:${server.port}`]) {
        for (const onError of ['fail', 'local']) {
          const m = manager({ url, onError })
          const user = uid()
          const result = await m.getValidToken(user, expired(user), refresher()).catch((e) => e)
          if (onError === 'fail') {
            expect(result.code).toBe('COORDINATOR_UNAVAILABLE')
            expect(result.message).toMatch(/Redis refused the credentials/)
            expect(result.message).not.toMatch(/wrong-pw-9|s3cret|admin-pw/)
          } else {
            expect(result.shouldUpdate).toBe(true)
          }
        }
      }
      expect(w.seen.length).toBeGreaterThan(0)
      for (const message of w.seen) {
        expect(message).toMatch(/Redis refused the credentials/)
        expect(message).not.toMatch(/wrong-pw-9|s3cret|admin-pw/)
      }
    } finally {
      w.off()
    }
  })
})

describe('Redis Cluster (three masters)', () => {
  let cluster
  let aclNodes
  beforeAll(async () => {
    cluster = await startCluster({ masters: 3 })
    for (const port of cluster.ports) await cli(port, 'acl', 'setuser', ...acl, '+cluster|slots')
    aclNodes = cluster.ports.map((p) => `redis://ttm:${encodeURIComponent(password)}@127.0.0.1:${p}`)
  })
  afterAll(async () => {
    await cluster?.stop()
  })

  it('3 processes × 30 users: exactly one refresh per user, keys spread over the nodes', async () => {
    const { userPrefix } = await storm({ redis: () => ({ cluster: cluster.urls }), users: 30 })
    // Every user's record lives on the node serving its slot: all nodes hold some.
    const perNode = await Promise.all(cluster.ports.map((p) => cli(p, 'dbsize')))
    expect(perNode.map(Number).every((n) => n > 0)).toBe(true)
    expect(new Set(Array.from({ length: 30 }, (_, i) => userSlot(`${userPrefix}${i}`))).size).toBeGreaterThan(20)
  })

  it('announcements reach waiters whichever node serves the user (as an ACL user with the least rights)', async () => {
    // lockTtlMs far above the wait: a waiter woken by the lock running out would fail the time bound.
    const a = manager({ cluster: aclNodes, lockTtlMs: 20_000, onError: 'fail' }, { refreshTimeoutMs: 30_000 })
    const b = manager({ cluster: aclNodes, lockTtlMs: 20_000, onError: 'fail' }, { refreshTimeoutMs: 30_000 })
    // Both connected first: otherwise the leader's slot-map discovery can
    // let the waiter reach the user's slot before it, and the roles swap.
    await Promise.all([a, b].map((m) => m.getValidToken(uid('warm'), { accessToken: '', expiresAt: 0 }, async () => ({ accessToken: 'w', expiresIn: 3600 }))))
    const byNode = new Map()
    for (let i = 0; byNode.size < 3 && i < 200; i++) {
      const user = uid('node')
      const node = await cluster.ownerOf(userSlot(user))
      if (!byNode.has(node)) byNode.set(node, user)
    }
    expect(byNode.size).toBe(3)
    for (const user of byNode.values()) {
      const leading = a.getValidToken(user, expired(user), refresher({ delayMs: 300 }))
      await sleep(50)
      const started = Date.now()
      const unused = refresher()
      const waited = await b.getValidToken(user, expired(user), unused)
      expect(waited).toMatchObject({ accessToken: (await leading).accessToken, shouldUpdate: false })
      expect(unused).not.toHaveBeenCalled()
      expect(Date.now() - started).toBeLessThan(5_000)
    }
  })

  it('a wrong password or no reachable node says so, and never shows the password', async () => {
    const unreachable = `redis://127.0.0.1:${await freePort()}`
    for (const [nodes, message] of [
      [cluster.ports.map((p) => `redis://ttm:wrong-pw-9@127.0.0.1:${p}`), /Redis refused the credentials/],
      [[unreachable], /Redis refused the connection/],
    ]) {
      const m = manager({ cluster: nodes, onError: 'fail' })
      const user = uid()
      const error = await m.getValidToken(user, expired(user), refresher()).catch((e) => e)
      expect(error.code).toBe('COORDINATOR_UNAVAILABLE')
      expect(error.message).toMatch(message)
      expect(error.message).not.toMatch(/wrong-pw-9/)
    }
  })

  it('slots migrating to another node mid-storm: still one refresh per user, no error, no fallback', async () => {
    let movedSlots = []
    await storm({
      redis: () => ({ cluster: cluster.urls }),
      users: 30,
      during: async (provider, userPrefix) => {
        // Every slot of node 0 holding a user in this storm moves to node 1
        // while their refreshes run (locks held, waiters waiting): lock,
        // record and announcement follow MOVED/ASK to the new owner.
        const slots = [...new Set(Array.from({ length: 30 }, (_, i) => userSlot(`${userPrefix}${i}`)))]
        const owners = await Promise.all(slots.map((s) => cluster.ownerOf(s)))
        movedSlots = slots.filter((_, i) => owners[i] === 0)
        // Every user's refresh in flight (its slot's restart marker written)
        // as the migration starts. A slot whose very first refresh races its
        // migration can trip the restart guard (docs/redis.md, Cluster).
        while (provider.stats.requests < 30) await sleep(10)
        expect(provider.stats.refreshes).toBe(0)
        for (const slot of movedSlots) await cluster.moveSlot(slot, 1)
      },
    })
    expect(movedSlots.length).toBeGreaterThan(3)
    for (const slot of movedSlots) expect(await cluster.ownerOf(slot)).toBe(1)
  })
})

describe('invalidate and key rotation across processes', () => {
  let redis
  const [k1, k2] = [newKey(), newKey()]
  const instances = []
  const instance = async (name, keys) => {
    const i = await startInstance({ name, redis: { url: redis.url, encryptionKey: keys } })
    instances.push(i)
    return i
  }
  beforeAll(async () => {
    redis = await startRedis()
  })
  afterEach(async () => {
    await Promise.all(instances.splice(0).map((i) => i.stop()))
  })
  afterAll(async () => {
    await redis?.stop()
  })

  it('invalidate reaches the other instances within 200 ms, and one that was not listening does not adopt the token later', async () => {
    // Mid-rotation too: the two seal with different keys.
    const a = await instance('a', [k1, k2])
    const b = await instance('b', [k2, k1])
    const user = uid()
    const t1 = await a.call('get', user, expired(user))
    const shared = await b.call('get', user, expired(user))
    expect(shared.accessToken).toBe(t1.accessToken) // b holds it now, without refreshing
    expect((await b.call('stats')).refreshFnCalls).toBe(0)
    const presented = { accessToken: t1.accessToken, refreshToken: t1.refreshToken, expiresAt: t1.expiresAt }
    expect((await b.call('get', user, presented)).accessToken).toBe(t1.accessToken)

    const started = Date.now()
    await a.call('invalidate', user, t1.accessToken) // a's API answered 401
    let answer
    do answer = await b.call('get', user, presented)
    while (answer.accessToken === t1.accessToken && Date.now() - started < 2_000)
    const elapsed = Date.now() - started
    expect(answer.accessToken).not.toBe(t1.accessToken)
    expect(answer.shouldUpdate).toBe(true)
    expect(elapsed).toBeLessThan(200)

    // Not listening at the time: started only after the invalidate.
    const other = uid()
    const t2 = await a.call('get', other, expired(other))
    await a.call('invalidate', other, t2.accessToken)
    await sleep(100)
    const late = await instance('late', [k1])
    const got = await late.call('get', other, expired(other))
    expect(got.accessToken).not.toBe(t2.accessToken)
    expect((await late.call('stats')).refreshFnCalls).toBe(1)
    for (const i of [a, b, late]) expect((await i.call('stats')).warnings).toEqual([])
  })

  it('rotation: instances on [old, new] and [new, old] read each other, with no undecryptable token', async () => {
    const before = await instance('before', [k1, k2])
    const after = await instance('after', [k2, k1])
    const done = await instance('done', [k2])
    const [u1, u2] = [uid(), uid()]
    const t1 = await before.call('get', u1, expired(u1)) // sealed with k1
    const t2 = await after.call('get', u2, expired(u2)) // sealed with k2
    expect((await after.call('get', u1, expired(u1))).accessToken).toBe(t1.accessToken)
    expect((await before.call('get', u2, expired(u2))).accessToken).toBe(t2.accessToken)
    // The last step ([new] alone) reads what the middle step wrote.
    expect((await done.call('get', u2, expired(u2))).accessToken).toBe(t2.accessToken)
    for (const [i, refreshed] of [
      [before, 1],
      [after, 1],
      [done, 0],
    ]) {
      const s = await i.call('stats')
      expect(s.refreshFnCalls).toBe(refreshed)
      // `done` holds only the new key while `before` still signs notices
      // with the old one: those it drops, and may say so; nothing else.
      expect(s.warnings.filter((w) => w.code !== 'TTM_REDIS_NOTICE_DROPPED')).toEqual([])
    }
  })

  it('encryptionKey lists are checked at construction, naming the bad entry, never echoing a key', () => {
    for (const [encryptionKey, message] of [
      [[], /encryptionKey must be a base64 string, or a non-empty array/],
      [[k1, 7], /encryptionKey must be a base64 string, or a non-empty array/],
      [[k1, 'c2hvcnQ='], /encryptionKey entry 1 must decode to exactly 32 bytes/],
      [Array.from({ length: 9 }, () => k1), /encryptionKey must hold 1 to 8 keys/],
    ]) {
      let error
      try {
        new TokenManager({ redis: { url: redis.url, encryptionKey } })
      } catch (e) {
        error = e
      }
      expect(error?.code).toBe('INVALID_ARGUMENT')
      expect(error.message).toMatch(message)
      expect(error.message).not.toContain(k1)
    }
  })
})
