// The addon in the places a Next.js server runs it: worker threads, and
// short scripts that must exit by themselves when nothing is pending.
import { describe, expect, it } from 'vitest'
import { Worker } from 'node:worker_threads'

import { PKG, runNode } from './helpers/node.mjs'

const script = `
  const { getValidToken, tokenManager, TokenManager } = require(${JSON.stringify(PKG)})
  ;(async () => {
    const fresh = await getValidToken('u', { accessToken: 'a', expiresAt: Date.now() + 3600e3 }, () => { throw new Error('unused') })
    const refreshed = await getValidToken('u', { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b', expiresIn: 60 }))
    const failed = await new TokenManager().getValidToken('u', { accessToken: 'a', expiresAt: 0 }, async () => { throw new Error('x') }).catch((e) => e.code)
    console.log(JSON.stringify([fresh.accessToken, refreshed.accessToken, refreshed.shouldUpdate, failed, tokenManager.stats().refreshes]))
  })()
`

describe('worker_threads', () => {
  it('loads and refreshes in a worker, with its own singleton', async () => {
    const worker = new Worker(`${script.replace('console.log(', "require('node:worker_threads').parentPort.postMessage(")}`, { eval: true })
    const message = await new Promise((resolve, reject) => {
      worker.once('message', resolve)
      worker.once('error', reject)
    })
    expect(JSON.parse(message)).toEqual(['a', 'b', true, 'REFRESH_FAILED', 1])
    const exitCode = await new Promise((resolve) => worker.once('exit', resolve))
    expect(exitCode).toBe(0)
  })
})

describe('process lifetime', () => {
  it('a script that used the addon exits by itself with nothing pending', async () => {
    const r = await runNode(['-e', script])
    expect(r.err).toBe('')
    expect(r.signal).toBeNull()
    expect(r.code).toBe(0)
    expect(JSON.parse(r.out)).toEqual(['a', 'b', true, 'REFRESH_FAILED', 1])
  })

  it('a refresh that never settles ends with REFRESH_TIMEOUT, then the script exits', async () => {
    const r = await runNode([
      '-e',
      `const { TokenManager } = require(${JSON.stringify(PKG)})
       new TokenManager({ refreshTimeoutMs: 200 })
         .getValidToken('u', { accessToken: 'a', expiresAt: 0 }, () => new Promise(() => {}))
         .catch((e) => console.log(e.code))`,
    ])
    expect(r.code).toBe(0)
    expect(r.out.trim()).toBe('REFRESH_TIMEOUT')
  })

  it('loads as ESM too', async () => {
    const r = await runNode([
      '--input-type=module',
      '-e',
      `import { getValidToken, tokenManager } from ${JSON.stringify(PKG + 'index.mjs')}
       import cjs from ${JSON.stringify(PKG + 'index.js')}
       const t = await getValidToken('u', { accessToken: 'a', expiresAt: new Date(Date.now() + 3600e3) }, async () => ({}))
       console.log(t.accessToken, cjs.tokenManager === tokenManager)`,
    ])
    expect(r.code).toBe(0)
    expect(r.out.trim()).toBe('a true')
  })
})
