// Property-based tests (fast-check) over every argument of every export:
// helpers/fuzz.mjs runs them in a child process, so a crash is an exit
// status and a Rust panic is text on its stderr, both seen here.
import { describe, expect, it } from 'vitest'
import { fileURLToPath } from 'node:url'

import { runNode } from './helpers/node.mjs'

const FUZZ = fileURLToPath(new URL('./helpers/fuzz.mjs', import.meta.url))
// A few thousand cases per export; FUZZ_RUNS overrides (e.g. 200 while editing).
const RUNS = Number(process.env.FUZZ_RUNS ?? 3000)

describe('arbitrary arguments to every export', () => {
  it(
    `${RUNS} cases per export: no crash, no panic, no synchronous throw, no unhandled rejection; a valid answer or a stable code`,
    async () => {
      const r = await runNode([FUZZ, String(RUNS)])
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
