// Row 7, cold start: what a serverless or freshly scaled instance pays before
// its first answer. Each measurement is a new Node process
// (cold-start-child.mjs) that loads one competitor and makes one call; it
// reports milliseconds from its own start (performance.timeOrigin) to the
// answer: a valid token (hot path) in one process, an expired one (the first
// refresh, refreshFn resolving at once) in another. Wall time is the target;
// the CPU time the process used until its answer is printed beside it, and
// the part of the wall time spent loading the module: the share the package
// itself controls. `floor` is Node itself: a process that loads nothing.
//
// Fair loading: the children run plain `node`, no tsx. The seed is compiled
// from TypeScript to an ES module once, before any timing, with the
// TypeScript compiler (as an app's build would), into node_modules/.cache so
// that it resolves `async-mutex` from this repo like any app module. The
// addon is loaded through `index.mjs`, as `import 'tarabut-token-manager'`.
import { execFileSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { fileURLToPath, pathToFileURL } from 'node:url'

import ts from 'typescript'

const here = (p) => fileURLToPath(new URL(p, import.meta.url))
const CHILD = here('./cold-start-child.mjs')

/** The seed as an app would ship it: TypeScript compiled to JavaScript. */
export function compileSeed() {
  const source = readFileSync(here('./seed-token-manager.ts'), 'utf8')
  const { outputText } = ts.transpileModule(source, {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    fileName: 'seed-token-manager.ts',
  })
  const dir = here('../node_modules/.cache/tarabut-token-manager-bench')
  mkdirSync(dir, { recursive: true })
  const file = `${dir}/seed-token-manager.mjs`
  writeFileSync(file, outputText)
  return pathToFileURL(file).href
}

function child(name, path, seedUrl) {
  const env = { ...process.env }
  delete env.NODE_OPTIONS // no loader in the children, whatever the parent runs with
  const out = execFileSync(process.execPath, [CHILD, name, path, seedUrl], { encoding: 'utf8', env, timeout: 60_000 })
  return JSON.parse(out.trim().split('\n').pop())
}

const ms = (v) => (Number.isFinite(v) ? v.toFixed(1) : '—')

/** A harness Row: `rounds` fresh processes per competitor and path, interleaved. */
export function coldStartRow(id, { rounds }) {
  let seedUrl
  const measure = (name) => async () => {
    const hot = child(name, 'hot', seedUrl)
    const refresh = child(name, 'refresh', seedUrl)
    return { hotMs: hot.ms, refreshMs: refresh.ms, hotCpuMs: hot.cpuMs, refreshCpuMs: refresh.cpuMs, importMs: hot.importMs }
  }
  return {
    id,
    title: 'cold start, a fresh process per answer',
    rounds,
    setup: async () => {
      seedUrl = compileSeed()
      // Untimed: every file in the page cache before round 1.
      for (const name of ['seed', 'addon', 'floor']) child(name, 'refresh', seedUrl)
    },
    run: { seed: measure('seed'), addon: measure('addon'), floor: measure('floor') },
    metrics: [
      { key: 'hotMs', label: 'ms from process start to a valid token', format: ms, target: '≤ 1.2×', met: ({ ratio }) => ratio <= 1.2 },
      { key: 'refreshMs', label: 'ms from process start to the first refresh', format: ms, target: '≤ 1.2×', met: ({ ratio }) => ratio <= 1.2 },
      { key: 'hotCpuMs', label: 'CPU ms until the valid token', format: ms },
      { key: 'refreshCpuMs', label: 'CPU ms until the first refresh', format: ms },
      { key: 'importMs', label: 'ms of the valid-token wall time spent loading the module', format: ms },
    ],
  }
}
