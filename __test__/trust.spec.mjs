// What the package trusts: only what the application passed as its own
// options (a polluted Object.prototype changes nothing and sees no secret;
// a misspelt option is an error, not a silent default).
import { describe, expect, it } from 'vitest'

import { TokenManager, oauth2Refresher, tarabutRefresher } from '../index.mjs'
import { runNode } from './helpers/node.mjs'
import { newKey } from './helpers/redis.mjs'

const typeError = (name) => expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(new RegExp(`^${name.replaceAll('.', '\\.')} `)) })

describe('options: own properties only', () => {
  it('a polluted Object.prototype (tokenUrl, redis, now, logger, a setter on clientSecret) changes nothing and sees no secret', async () => {
    const { code, out, err } = await runNode(['__test__/helpers/polluted.cjs'])
    expect(err).toBe('')
    expect(code).toBe(0)
    const got = JSON.parse(out)
    // The listening token endpoint and the "Redis" received nothing; the setter saw nothing.
    expect(got.hits).toEqual({ http: 0, tcp: 0, setter: [], logger: 0 })
    // `now: () => 0` from the prototype would have served the expired token.
    expect(got.outcomes.singleton).toBe('new')
    expect(got.outcomes.constructed).toBe('new')
    expect(got.refreshed).toBe(2)
    expect(got.outcomes.tarabut).not.toBe('ok')
    expect(out).not.toContain('TOP-SECRET')
  }, 20_000)

  it('an unknown key is a TypeError naming it: manager, redis, redis.tls, openTelemetry, refreshers', () => {
    expect(() => new TokenManager({ bufferTme: 1_000 })).toThrow(typeError('options.bufferTme'))
    const redis = { url: 'redis://127.0.0.1:1', encryptionKey: newKey() }
    expect(() => new TokenManager({ redis: { ...redis, redisUrl: 'redis://127.0.0.1:2' } })).toThrow(typeError('options.redis.redisUrl'))
    expect(() => new TokenManager({ openTelemetry: { tracerprovider: {} } })).toThrow(typeError('options.openTelemetry.tracerprovider'))
    expect(() => tarabutRefresher({ clientId: 'c', clientSecret: 's', tokenURL: 'https://x' })).toThrow(typeError('options.tokenURL'))
    expect(() => oauth2Refresher({ tokenUrl: 'https://x', clientId: 'c', clientSecret: 's', scopes: 'a' })).toThrow(typeError('options.scopes'))
  })

  it('encryptionKey: all-zero and repeated keys are refused, naming the entry, never echoing a key', () => {
    const k = newKey()
    for (const [encryptionKey, message] of [
      [Buffer.alloc(32).toString('base64'), /^options\.redis\.encryptionKey is all zero bytes/],
      [[k, newKey(), k], /^options\.redis\.encryptionKey entry 2 repeats an earlier key/],
    ]) {
      let error
      try {
        new TokenManager({ redis: { url: 'redis://127.0.0.1:1', encryptionKey } })
      } catch (e) {
        error = e
      }
      expect(error).toMatchObject({ name: 'RangeError', code: 'INVALID_ARGUMENT' })
      expect(error.message).toMatch(message)
      expect(error.message).not.toContain(k)
    }
  })

  it('redis:// (no TLS) to another host: one TTM_REDIS_PLAINTEXT warning, never showing the URL', async () => {
    const warned = []
    const logger = { warn: (fields, message) => warned.push({ ...fields, message }), error: () => {} }
    const redis = (url) => ({ url, encryptionKey: newKey(), userIdKey: newKey() })
    for (const url of ['redis://127.0.0.1:1', 'redis://localhost:1', 'redis://[::1]:1', 'rediss://:s3cret@192.0.2.1:6379']) {
      await new TokenManager({ logger, redis: redis(url) }).close()
    }
    expect(warned).toEqual([])
    await new TokenManager({ logger, redis: redis('redis://:s3cret@192.0.2.1:6379') }).close()
    await new TokenManager({ logger, redis: { cluster: ['redis://127.0.0.1:1', 'redis://:s3cret@192.0.2.2:7000'], encryptionKey: newKey(), userIdKey: newKey() } }).close()
    expect(warned.map((w) => w.code)).toEqual(['TTM_REDIS_PLAINTEXT', 'TTM_REDIS_PLAINTEXT'])
    expect(JSON.stringify(warned)).not.toMatch(/s3cret|192\.0\.2/)
  })

  it('options are own properties: inherited ones are not options, and each is read once', () => {
    // An options object whose prototype carries a bad value: ignored, not read.
    const inherited = Object.create({ bufferTimeMs: 'not a number', redis: { url: 'redis://127.0.0.1:1' } })
    expect(() => new TokenManager(inherited)).not.toThrow()
    let reads = 0
    const options = {
      get bufferTimeMs() {
        reads++
        return 1_000
      },
    }
    expect(() => new TokenManager(options)).not.toThrow()
    expect(reads).toBe(1)
  })

  it('a logger method counts only on the logger or its class, not on Object.prototype', () => {
    class Logger {
      warn() {}
      error() {}
    }
    expect(() => new TokenManager({ logger: new Logger() })).not.toThrow()
    Object.prototype.warn = () => {}
    Object.prototype.error = () => {}
    try {
      expect(() => new TokenManager({ logger: {} })).toThrow(typeError('options.logger.warn'))
    } finally {
      delete Object.prototype.warn
      delete Object.prototype.error
    }
  })
})
