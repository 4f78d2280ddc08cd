// The stable error codes (README: Errors) have one source at run time: the
// core's list (`errorCodes()`, written once in src/engine/error.rs), which
// lib/errors.js reads. The README table and index.d.ts's
// TokenRefreshErrorCode are written for readers; these keep them in step.
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { describe, expect, it } from 'vitest'

const require = createRequire(import.meta.url)
const binding = require('../binding.js')
const { callerError } = require('../lib/errors.js')

const read = (file) => readFileSync(new URL(`../${file}`, import.meta.url), 'utf8')

/** README's Errors table, as [code, class] rows. */
function readmeRows() {
  const section = read('README.md').split('\n### Errors\n')[1].split('\n#')[0]
  return [...section.matchAll(/^\| `([A-Z_]+)` \| `(\w+)`/gm)].map((m) => [m[1], m[2]])
}

describe('error codes', () => {
  it("README's Errors table lists the core's codes, in its order", () => {
    expect(readmeRows().map(([code]) => code)).toEqual(binding.errorCodes())
  })

  it("index.d.ts's TokenRefreshErrorCode names the codes README gives to TokenRefreshError", () => {
    const union = read('index.d.ts').split('export type TokenRefreshErrorCode =')[1].split('\n\n')[0]
    const named = [...union.matchAll(/\| '([A-Z_]+)'/g)].map((m) => m[1])
    const refreshCodes = readmeRows().filter(([, cls]) => cls === 'TokenRefreshError')
    expect(named).toEqual(refreshCodes.map(([code]) => code))
    expect(named.length).toBeGreaterThan(0)
  })

  it("an error carrying one of the core's codes is the package's own; any other code is the caller's", () => {
    for (const code of binding.errorCodes()) {
      const ours = Object.assign(new Error('ours'), { code })
      const seen = callerError(ours, 'token')
      expect(seen.code).toBe(code)
      expect(seen.cause).toBeUndefined()
    }
    const theirs = Object.assign(new Error('theirs'), { code: 'ECONNRESET' })
    expect(callerError(theirs, 'token')).toMatchObject({ code: 'INVALID_ARGUMENT', cause: theirs })
  })
})
