// `node scripts/check-glibc.mjs <file.node> [max]`: fails when the binary
// needs a glibc symbol version newer than `max` (default 2.17, the oldest
// glibc the linux-gnu packages support: what napi-rs's own packages target).
//
// Reads the dynamic symbol table with `objdump -T` (binutils: the linker
// Rust uses on Linux comes with it) and keeps the undefined symbols, the
// ones the binary takes from the system's glibc.
import { execFileSync } from 'node:child_process'
import { pathToFileURL } from 'node:url'

export const GLIBC_BASELINE = '2.17'

const parse = (v) => v.split('.').map(Number)
export function compareVersions(a, b) {
  const [x, y] = [parse(a), parse(b)]
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0)
    if (d !== 0) return Math.sign(d)
  }
  return 0
}

/** `{ format, required: [{ symbol, version }] }`: the glibc symbols `file` needs. */
export function glibcRequirements(file) {
  let out
  try {
    out = execFileSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 << 20 })
  } catch (e) {
    if (e.code === 'ENOENT') throw new Error('objdump not found: install binutils (Debian/Ubuntu: apt-get install binutils)')
    throw e
  }
  const format = out.match(/file format (\S+)/)?.[1]
  const required = []
  for (const line of out.split('\n')) {
    // 0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) pthread_create
    const m = line.match(/\*UND\*\s+\S+\s+\(?GLIBC_([\d.]+)\)?\s+(\S+)/)
    if (m) required.push({ version: m[1], symbol: m[2] })
  }
  return { format, required }
}

/** The symbols of `file` that need a glibc newer than `max`. */
export function newerThan(file, max = GLIBC_BASELINE) {
  return glibcRequirements(file).required.filter((r) => compareVersions(r.version, max) > 0)
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const [file, max = GLIBC_BASELINE] = process.argv.slice(2)
  const { required } = glibcRequirements(file)
  const newest = required.map((r) => r.version).sort(compareVersions).at(-1)
  const bad = required.filter((r) => compareVersions(r.version, max) > 0)
  if (required.length === 0) {
    console.error(`${file}: no glibc symbols found (not a dynamically linked glibc binary?)`)
    process.exitCode = 1
  } else if (bad.length > 0) {
    console.error(`${file} needs glibc newer than ${max}: ${bad.map((r) => `${r.symbol}@GLIBC_${r.version}`).join(', ')}`)
    process.exitCode = 1
  } else {
    console.log(`${file}: newest glibc symbol GLIBC_${newest} (at most ${max})`)
  }
}
