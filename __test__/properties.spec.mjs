// Property-based tests (fast-check) over every argument of every export:
// helpers/fuzz.mjs runs them in a child process, so a crash is an exit
// status and a Rust panic is text on its stderr, both seen here.
import { describe, expect, it } from 'vitest'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const FUZZ = fileURLToPath(new URL('./helpers/fuzz.mjs', import.meta.url))
// A few thousand cases per export; FUZZ_RUNS overrides (e.g. 200 while editing).
const RUNS = Number(process.env.FUZZ_RUNS ?? 3000)

function run() {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [FUZZ, String(RUNS)], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.on('data', (d) => (out += d))
    child.stderr.on('data', (d) => (err += d))
    child.on('error', reject)
    child.on('exit', (code, signal) => resolve({ code, signal, out, err }))
  })
}

describe('arbitrary arguments to every export', () => {
  it(
    `${RUNS} cases per export: no crash, no panic, no synchronous throw, no unhandled rejection; a valid answer or a stable code`,
    async () => {
      const r = await run()
      expect(r.err).not.toMatch(/panick|RUST_BACKTRACE/)
      expect(r.signal).toBeNull()
      expect(r.code).toBe(0)
      const report = JSON.parse(r.out.trim().split('\n').pop())
      expect(report.failures).toEqual([])
      expect(report.unhandled).toBe(0)
      expect(report.runs).toBe(RUNS)
      expect(r.err).toBe('')
    },
    300_000,
  )
})
