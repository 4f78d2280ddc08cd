// `npm run package [-- --target <triple>] [-- --no-build]`: this machine's
// release build, packed into dist/ as the two tarballs npm would publish for
// it:
//
//   dist/tarabut-token-manager-<version>.tgz                  the JS entry, no binary
//   dist/tarabut-token-manager-<platform>-<version>.tgz       the binary, e.g. linux-x64-gnu
//
// Installing both (`npm install dist/*.tgz`) needs no Rust toolchain.
//
// The release workflow makes the same packages for every target with the napi
// CLI: `napi artifacts` moves each built binary into its npm/<platform>
// package, `napi prepublish` writes the main package's optionalDependencies
// (one per napi.targets entry, at the package's version) and publishes the
// platform packages. Here only this machine's binary exists, which
// `napi prepublish` refuses (it checks every platform's), so the main
// package's optionalDependencies are written the way it writes them; the
// platform package goes through `napi artifacts`, limited to this target.
import { execFileSync } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

import { parseTriple, readNapiConfig } from '@napi-rs/cli'

import { build, hostTriple, napiBin, npm, root, targetArg } from './build.mjs'

export const dist = path.join(root, 'dist')

const npmOut = (args, cwd) => npm(args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
const packInto = (dir) => JSON.parse(npmOut(['pack', '--json', '--pack-destination', dist], dir))[0].filename

/**
 * `triple`: the target to pack (default: this machine's). `build: false`
 * packs the binary already in the repo root (left by `npm run build`, or
 * downloaded by the release workflow), and needs no Rust toolchain when
 * `triple` is given.
 */
export async function pack({ build: rebuild = true, triple } = {}) {
  const target = parseTriple(rebuild ? build({ triple }) : (triple ?? hostTriple()))
  const config = await readNapiConfig(path.join(root, 'package.json'))
  const { packageName, binaryName, packageJson } = config
  if (!config.targets.some((t) => t.triple === target.triple)) {
    throw new Error(`target ${target.triple} is not in package.json napi.targets`)
  }

  const binary = `${binaryName}.${target.platformArchABI}.node`
  if (!existsSync(path.join(root, binary))) {
    throw new Error(`${binary} is not in the repository root: run npm run build (or place the release workflow's artifact there)`)
  }

  rmSync(dist, { recursive: true, force: true })
  const stage = path.join(dist, '.stage')
  mkdirSync(stage, { recursive: true })

  // The main package: exactly the files `npm pack` of the repo takes (its
  // "files" list), with the optionalDependencies `napi prepublish` adds.
  const main = path.join(stage, 'main')
  const listed = JSON.parse(npmOut(['pack', '--dry-run', '--json'], root))[0].files.map((f) => f.path)
  for (const file of listed) cpSync(path.join(root, file), path.join(main, file))
  const manifest = JSON.parse(readFileSync(path.join(main, 'package.json'), 'utf8'))
  manifest.optionalDependencies = {
    ...manifest.optionalDependencies,
    ...Object.fromEntries(config.targets.map((t) => [`${packageName}-${t.platformArchABI}`, packageJson.version])),
  }
  writeFileSync(path.join(main, 'package.json'), `${JSON.stringify(manifest, null, 2)}\n`)

  // This platform's package: npm/<platform> plus the binary, placed by
  // `napi artifacts` from a manifest that lists only this machine's target.
  const host = path.join(stage, 'host')
  const platformDir = path.join('npm', target.platformArchABI)
  cpSync(path.join(root, platformDir), path.join(host, platformDir), { recursive: true })
  cpSync(path.join(root, binary), path.join(host, 'artifacts', binary))
  writeFileSync(
    path.join(host, 'package.json'),
    JSON.stringify({ name: packageName, version: packageJson.version, napi: { binaryName, targets: [target.triple] } }),
  )
  execFileSync(process.execPath, [napiBin(), 'artifacts', '--output-dir', 'artifacts', '--npm-dir', 'npm'], {
    cwd: host,
    stdio: ['ignore', 'ignore', 'pipe'], // its error, if any, is in the exception
  })
  const platformManifest = path.join(host, platformDir, 'package.json')
  const platformJson = JSON.parse(readFileSync(platformManifest, 'utf8'))
  platformJson.version = packageJson.version // as `napi prepublish` does
  writeFileSync(platformManifest, `${JSON.stringify(platformJson, null, 2)}\n`)

  const tarballs = { main: packInto(main), platform: packInto(path.join(host, platformDir)) }
  rmSync(stage, { recursive: true, force: true })
  return {
    target,
    binary,
    main: path.join(dist, tarballs.main),
    platform: path.join(dist, tarballs.platform),
    platformPackage: platformJson.name,
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const started = Date.now()
  const out = await pack({ build: !process.argv.includes('--no-build'), triple: targetArg() })
  for (const file of readdirSync(dist)) console.log(`dist/${file}`)
  console.log(`${out.target.triple}: packed in ${Math.round((Date.now() - started) / 1000)} s`)
}
