// The linux-x64-gnu / linux-arm64-gnu binaries promise glibc 2.17 or later:
// the packed binary may need no glibc symbol version newer than that.
import { execFileSync } from 'node:child_process'
import { rmSync } from 'node:fs'
import path from 'node:path'

import { afterAll, describe, expect, it } from 'vitest'

import { GLIBC_BASELINE, compareVersions, glibcRequirements } from '../../scripts/check-glibc.mjs'
import { newTempDir, tarballs } from './support.mjs'

const packed = tarballs()
const gnu = packed.platformPackage.endsWith('-gnu')
let dir

afterAll(() => dir && rmSync(dir, { recursive: true, force: true }))

describe.runIf(gnu)(`the packed ${packed.platformPackage} binary`, () => {
  it(`needs no glibc symbol newer than GLIBC_${GLIBC_BASELINE}`, () => {
    dir = newTempDir('ttm-glibc-')
    execFileSync('tar', ['-xzf', packed.platform, '-C', dir, `package/${packed.binary}`])
    const { format, required } = glibcRequirements(path.join(dir, 'package', packed.binary))
    expect(format).toMatch(/^elf64-/)
    // A binary taking nothing from glibc would pass vacuously: it must be one that does.
    expect(required.map((r) => r.symbol)).toContain('pthread_create')
    const newer = required.filter((r) => compareVersions(r.version, GLIBC_BASELINE) > 0).map((r) => `${r.symbol}@GLIBC_${r.version}`)
    expect(newer).toEqual([])
  })
})
