// `npm test` provisions redis-server itself (scripts/ensure-redis.mjs runs
// first): present, it says nothing; absent and not installable here, it stops
// at once with one line naming the install command.
import { spawnSync } from 'node:child_process'
import { chmodSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { afterAll, describe, expect, it } from 'vitest'

import { installCommand } from '../scripts/ensure-redis.mjs'

const SCRIPT = fileURLToPath(new URL('../scripts/ensure-redis.mjs', import.meta.url))
const dirs = []
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })))

/** A PATH holding only node and the given fake executables. */
function pathWith(...tools) {
  const dir = mkdtempSync(path.join(tmpdir(), 'ttm-path-'))
  dirs.push(dir)
  symlinkSync(process.execPath, path.join(dir, 'node'))
  for (const t of tools) {
    writeFileSync(path.join(dir, t), '#!/bin/sh\nexit 0\n')
    chmodSync(path.join(dir, t), 0o755)
  }
  return dir
}

const run = (PATH) => spawnSync(process.execPath, [SCRIPT], { env: { PATH }, encoding: 'utf8', timeout: 10_000 })

describe('scripts/ensure-redis.mjs', () => {
  it('says nothing and succeeds when redis-server and redis-cli are on the PATH', () => {
    const r = run(pathWith('redis-server', 'redis-cli'))
    expect(r.status).toBe(0)
    expect(r.stdout + r.stderr).toBe('')
  })

  it('without them and without apt-get: one line naming the install command, exit 1, at once', () => {
    const started = Date.now()
    const r = run(pathWith('redis-cli'))
    expect(r.status).toBe(1)
    expect(r.stdout).toBe('')
    const lines = r.stderr.trimEnd().split('\n')
    expect(lines).toHaveLength(1)
    expect(lines[0]).toMatch(/^redis-server not found on the PATH; the tests need it: /)
    expect(lines[0].endsWith(installCommand())).toBe(true)
    expect(Date.now() - started).toBeLessThan(5_000)
  })

  it('names the command for each platform', () => {
    expect(installCommand('darwin')).toBe('brew install redis')
    expect(installCommand('linux', { ID: 'debian' })).toBe('sudo apt-get install redis-server')
    expect(installCommand('linux', { ID: 'linuxmint', ID_LIKE: 'ubuntu debian' })).toBe('sudo apt-get install redis-server')
    expect(installCommand('linux', { ID: 'alpine' })).toBe('apk add redis')
    expect(installCommand('linux', { ID: 'fedora' })).toBe('sudo dnf install redis')
    expect(installCommand('linux', { ID: 'amzn', ID_LIKE: 'centos rhel fedora' })).toBe('sudo dnf install redis6')
    expect(installCommand('linux', { ID: 'arch' })).toBe('sudo pacman -S redis')
    expect(installCommand('win32')).toMatch(/WSL/)
  })
})
