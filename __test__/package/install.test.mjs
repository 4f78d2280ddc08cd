// The published shape, installed the way a user gets it: both tarballs of
// `npm run package` in a new project outside this repo (no access to its
// node_modules), with no Rust toolchain on the PATH. From there, on each
// supported Node: import and require the package, the hot path and a
// refresh, tarabutRefresher against a Tarabut-compatible server, and the
// Redis mode against a real redis-server.
import { execFile, execFileSync } from 'node:child_process'
import { copyFileSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { promisify } from 'node:util'

import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { napiBin, npm } from '../../scripts/build.mjs'
import { compareVersions } from '../../scripts/check-glibc.mjs'
import { onPath } from '../../scripts/ensure-redis.mjs'
import { cli, newKey, startRedis } from '../helpers/redis.mjs'
import { startTarabutServer } from '../helpers/tarabut-server.mjs'
import { ALL_NODE_VERSIONS, NODE_VERSIONS, newTempDir, nodeBinary, root, tarballs, toolchainFreeEnv, withRedis } from './support.mjs'

const execFileAsync = promisify(execFile)
const FIXTURES = new URL('./fixtures/', import.meta.url)
const { version: VERSION, napi, engines: { node: engines } } = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'))
let packed
let project
let tarabut
let redis
const key = newKey()
const nodes = new Map()

beforeAll(async () => {
  packed = tarballs()
  for (const v of NODE_VERSIONS) nodes.set(v, nodeBinary(v))
  project = newTempDir('ttm-install-')
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'ttm-smoke', private: true }))
  for (const f of ['smoke.mjs', 'smoke.cjs']) copyFileSync(new URL(f, FIXTURES), path.join(project, f))
  // --prefer-offline: the main package's dependencies come from npm's cache
  // where it has them (this repository's npm ci put their tarballs there)
  // and from the registry where it does not (npm ci caches no full
  // packument, which resolving a range from a tarball needs); the other
  // platforms' packages (optional, unpublished, not for this machine) are
  // skipped.
  npm(['install', '--prefer-offline', '--no-audit', '--no-fund', packed.main, packed.platform], {
    cwd: project,
    env: toolchainFreeEnv(path.dirname(process.execPath)),
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  tarabut = await startTarabutServer()
  if (withRedis) redis = await startRedis()
})

afterAll(async () => {
  await tarabut?.close()
  await redis?.stop()
  if (project) rmSync(project, { recursive: true, force: true })
})

describe('the installed tarballs', () => {
  it('hold the JS entry and the binary in separate packages, the main one listing every platform', () => {
    const modules = path.join(project, 'node_modules')
    const main = path.join(modules, 'tarabut-token-manager')
    expect(readdirSync(main).filter((f) => f.endsWith('.node'))).toEqual([])
    expect(readdirSync(path.join(modules, packed.platformPackage))).toContain(packed.binary)

    const manifest = JSON.parse(readFileSync(path.join(main, 'package.json'), 'utf8'))
    const platforms = readdirSync(path.join(root, 'npm')).map((d) => JSON.parse(readFileSync(path.join(root, 'npm', d, 'package.json'), 'utf8')).name)
    expect(platforms).toHaveLength(napi.targets.length)
    expect(manifest.optionalDependencies).toEqual(Object.fromEntries(platforms.map((name) => [name, VERSION])))
    expect(manifest.scripts?.preinstall ?? manifest.scripts?.install ?? manifest.scripts?.postinstall).toBeUndefined()
  })

  it('claim in engines exactly the Node lines tested here, each from a floor at or below the version tested', () => {
    const ranges = engines.split('||').map((r) => r.trim().match(/^\^(\d+)\.(\d+)\.(\d+)$/))
    expect(ranges.every(Boolean)).toBe(true)
    expect(ranges.map((m) => m[1]).sort()).toEqual(ALL_NODE_VERSIONS.map((v) => v.split('.')[0]).sort())
    for (const v of ALL_NODE_VERSIONS) {
      const floor = ranges.find((m) => m[1] === v.split('.')[0]).slice(1).join('.')
      expect(compareVersions(floor, v)).toBeLessThanOrEqual(0)
    }
  })
})

describe('the platform packages under npm/', () => {
  it('are what `napi create-npm-dirs` makes of package.json (targets, engines, os/cpu/libc)', () => {
    const dir = newTempDir('ttm-npm-dirs-')
    try {
      copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'))
      execFileSync(process.execPath, [napiBin(), 'create-npm-dirs'], { cwd: dir, stdio: 'ignore' })
      const manifests = (base) =>
        Object.fromEntries(readdirSync(base).map((d) => [d, JSON.parse(readFileSync(path.join(base, d, 'package.json'), 'utf8'))]))
      expect(manifests(path.join(root, 'npm'))).toEqual(manifests(path.join(dir, 'npm')))
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe.each(NODE_VERSIONS)('installed, on Node %s, without a Rust toolchain', (version) => {
  // Asynchronous: the token server and Redis helpers live in this process.
  const run = async (script, arg) => {
    const node = nodes.get(version)
    const env = toolchainFreeEnv(path.dirname(node))
    expect(onPath('cargo', env.PATH) || onPath('rustc', env.PATH)).toBe(false)
    const args = [script, ...(arg ? [JSON.stringify(arg)] : [])]
    const { stdout } = await execFileAsync(node, args, { cwd: project, env, encoding: 'utf8', timeout: 30_000 }).catch((e) => {
      throw new Error(`${script} on Node ${version} exited with ${e.code ?? e.signal}:\n${e.stderr}${e.stdout}`)
    })
    return JSON.parse(stdout.trim().split('\n').at(-1))
  }

  it(`import: hot path, refresh, typed errors, tarabutRefresher${withRedis ? ' and the Redis mode' : ''}`, async () => {
    const user = `node-${version}`
    const requestsBefore = tarabut.tokenRequests
    const out = await run('smoke.mjs', {
      tokenUrl: tarabut.tokenUrl,
      clientId: tarabut.clientId,
      clientSecret: tarabut.clientSecret,
      redisUrl: redis?.url,
      encryptionKey: key,
      user,
    })

    expect(out.node).toBe(`v${version}`)
    expect(out.resolved.startsWith(path.join(project, 'node_modules', 'tarabut-token-manager') + path.sep)).toBe(true)
    expect(out.version).toBe(VERSION)
    expect(out.sameInstance).toBe(true)
    // The binary came from the platform package, not from anywhere else.
    expect(out.loadedBinaries).toEqual([path.join(project, 'node_modules', packed.platformPackage, packed.binary)])

    expect(out.hot).toEqual({ accessToken: 'at-valid', shouldUpdate: false, refreshes: 0 })
    expect(out.refresh).toMatchObject({ accessToken: 'at-new-for-rt-old', refreshToken: 'rt-new', shouldUpdate: true })
    expect(out.refresh.expiresInS).toBeGreaterThan(3500)
    expect(out.badInput).toEqual({ name: 'TypeError', code: 'INVALID_ARGUMENT' })

    expect(out.tarabut.shouldUpdate).toBe(true)
    expect(tarabut.isCurrent(`${user}-tarabut`, out.tarabut.accessToken)).toBe(true)
    expect(tarabut.tokenRequests - requestsBefore).toBe(1)
    expect(tarabut.rejected).toBe(0)

    if (!withRedis) return
    expect(out.redis).toEqual({
      first: 'at-redis-1',
      firstShouldUpdate: true,
      second: 'at-redis-1',
      secondShouldUpdate: true,
      refreshes: 1,
      fallbacks: 0,
    })
    // It went through this Redis: keys under the default prefix, none naming the user.
    const keys = (await cli(redis.port, '--scan', '--pattern', 'ttm:*')).split('\n').filter(Boolean)
    expect(keys.length).toBeGreaterThan(0)
    expect(keys.filter((k) => k.includes(user))).toEqual([])
  })

  it('require: the CommonJS entry alone', async () => {
    const out = await run('smoke.cjs')
    expect(out.node).toBe(`v${version}`)
    expect(out.resolved.startsWith(path.join(project, 'node_modules', 'tarabut-token-manager') + path.sep)).toBe(true)
    expect(out.exports).toEqual({ tokenManager: true, TokenRefreshError: 'function' })
    expect(out.hot).toEqual({ accessToken: 'at-valid', shouldUpdate: false })
    expect(out.refresh).toEqual({ accessToken: 'at-new', shouldUpdate: true })
    expect(out.stats).toMatchObject({ hits: 1, refreshes: 1 })
  })
})
