// `npm run build [-- --target <triple>]`: the release addon for this machine
// (or for `triple`: the release workflow's build matrix), plus the generated
// binding.js and binding.d.ts.
//
// On a Linux glibc host it links against glibc 2.17 with the prebuilt gcc
// toolchain of `@napi-rs/cross-toolchain` (`--use-napi-cross`, cached in
// ~/.napi-rs after the first build), so the binary loads on every distro with
// glibc 2.17 or later, as the published linux-x64-gnu package must. Building
// the development binary the same way means the tests, the demo and the
// benchmarks run the binary `npm run package` ships, and packaging after a
// build compiles nothing again.
//
// package.json `overrides` pin `@napi-rs/cross-toolchain` to 1.0.0: the CLI's
// own 1.0.5 fetches the toolchain package of the same version, and the
// registry has no 1.0.5 of the x86_64 one. They also pin `@napi-rs/lzma`
// (which unpacks the toolchain) to 1.4.5: later versions install no binary
// on Node 20.
import { execFileSync } from 'node:child_process'
import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

export const root = fileURLToPath(new URL('..', import.meta.url))
const require = createRequire(import.meta.url)

/** The napi CLI's entry, to run with this Node. */
export function napiBin() {
  const pkg = require.resolve('@napi-rs/cli/package.json')
  return path.join(path.dirname(pkg), require(pkg).bin.napi)
}

/** This machine's Rust target triple, e.g. x86_64-unknown-linux-gnu. */
export function hostTriple() {
  const out = execFileSync('rustc', ['-vV'], { encoding: 'utf8' })
  return out.match(/^host: (\S+)$/m)[1]
}

/**
 * How the napi CLI builds `triple` on `host`: Linux glibc targets (x64,
 * arm64) with `--use-napi-cross` (glibc 2.17), a Linux musl target from
 * another host with `--cross-compile` (cargo-zigbuild: `zig` must be on the
 * PATH), the rest with the host's own toolchain.
 */
export function crossFlags(triple, host) {
  if (/^(x86_64|aarch64)-unknown-linux-gnu$/.test(triple)) return ['--use-napi-cross']
  if (triple.endsWith('-linux-musl') && triple !== host) return ['--cross-compile']
  return []
}

/** Builds the release addon for `triple` (default: this machine) into the repo root. */
export function build({ triple, stdio = 'inherit' } = {}) {
  const host = hostTriple()
  triple ??= host
  const args = ['build', '--platform', '--release', '--js', 'binding.js', '--dts', 'binding.d.ts', '--target', triple, ...crossFlags(triple, host)]
  execFileSync(process.execPath, [napiBin(), ...args], { cwd: root, stdio })
  return triple
}

/** Runs npm (on Windows npm is a .cmd script, which only a shell runs). */
export function npm(args, options = {}) {
  const win = process.platform === 'win32'
  return execFileSync(win ? 'npm.cmd' : 'npm', args, { ...options, shell: win })
}

/** `--target <triple>` from argv, if given. */
export function targetArg(argv = process.argv.slice(2)) {
  const i = argv.indexOf('--target')
  return i === -1 ? undefined : argv[i + 1]
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) build({ triple: targetArg() })
