// The code a reader copies compiles: every ```ts and ```js block of
// README.md and docs/*.md is type-checked under `tsc --strict` against the
// package's own types, and the blocks marked runnable are run. Markers (an
// HTML comment on the line before a block; docs/contributing.md):
//   <!-- snippet: assumes <TypeScript declarations> -->  a fragment, and what it relies on
//   <!-- snippet: runnable -->                            also run; must exit 0
// Relative links between the README and docs/ are checked as well.
import { execFile } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { afterAll, describe, expect, it } from 'vitest'

const run = promisify(execFile)
const require = createRequire(import.meta.url)
const root = fileURLToPath(new URL('..', import.meta.url))
// Inside the package, so `import 'tarabut-token-manager'` resolves to it (its
// `exports`), as in an app that installed it.
const dir = join(root, '__test__', '.snippets')

const docs = ['README.md', ...readdirSync(join(root, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`)]

/** Every checked block: where it is, its language, what it assumes, whether it runs. */
function blocks(file) {
  const text = readFileSync(join(root, file), 'utf8')
  const found = []
  const fence = /^```(\w*)[^\n]*\n([\s\S]*?)^```[ \t]*$/gm
  for (const m of text.matchAll(fence)) {
    const lang = { ts: 'ts', typescript: 'ts', js: 'js', javascript: 'js' }[m[1]]
    if (lang === undefined) continue
    const before = text.slice(0, m.index)
    // The last comment before the block, if nothing but blank space follows it.
    const marker = before.slice(before.lastIndexOf('<!--')).match(/^<!--\s*snippet:\s*(assumes|runnable)\b([\s\S]*?)-->\s*$/)
    found.push({
      file,
      line: before.split('\n').length + 1,
      lang,
      code: m[2],
      assumes: marker?.[1] === 'assumes' ? marker[2] : '',
      runnable: marker?.[1] === 'runnable',
    })
  }
  return found
}

const all = docs.flatMap(blocks)
const name = (b) => `${b.file.replace(/[/.]/g, '_')}_L${b.line}`

afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe('code in the README and docs', () => {
  it('finds the blocks (the README has a route, a runnable script and a refresh function)', () => {
    const readme = all.filter((b) => b.file === 'README.md')
    expect(readme.length).toBeGreaterThanOrEqual(4)
    expect(readme.some((b) => b.runnable)).toBe(true)
    expect(readme.some((b) => b.code.includes("'X-TG-CustomerUserId': userId") && b.code.includes('shouldUpdate'))).toBe(true)
  })

  it('every ts/js block type-checks under tsc --strict against index.d.ts', { timeout: 120_000 }, async () => {
    rmSync(dir, { recursive: true, force: true })
    mkdirSync(dir, { recursive: true })
    const files = []
    const where = new Map()
    for (const b of all) {
      const base = name(b)
      const file = `${base}.${b.lang === 'ts' ? 'mts' : 'mjs'}`
      // `export {}` keeps a block that imports nothing a module of its own.
      writeFileSync(join(dir, file), `${b.code}\nexport {}\n`)
      files.push(file)
      where.set(file, b)
      if (b.assumes.trim() !== '') {
        writeFileSync(join(dir, `${base}.assumes.d.ts`), b.assumes)
        files.push(`${base}.assumes.d.ts`)
        where.set(`${base}.assumes.d.ts`, { ...b, line: b.line - 1 })
      }
    }
    // Each block is compiled in a program of its own with its assumptions:
    // one block's `declare module` must not serve another.
    const failures = []
    for (const b of all) {
      const base = name(b)
      const own = files.filter((f) => f.startsWith(`${base}.`))
      writeFileSync(
        join(dir, `${base}.tsconfig.json`),
        JSON.stringify({
          compilerOptions: {
            strict: true,
            noEmit: true,
            allowJs: true,
            checkJs: true,
            module: 'nodenext',
            moduleResolution: 'nodenext',
            target: 'es2022',
            types: ['node'],
            skipLibCheck: true,
          },
          files: own,
        }),
      )
    }
    const tsc = require.resolve('typescript/bin/tsc')
    // tsc -b compiles every program in one process (each block alone).
    const solution = { files: [], references: all.map((b) => ({ path: `./${name(b)}.tsconfig.json` })) }
    for (const b of all) {
      const p = join(dir, `${name(b)}.tsconfig.json`)
      const c = JSON.parse(readFileSync(p, 'utf8'))
      c.compilerOptions.composite = true
      c.compilerOptions.noEmit = false
      c.compilerOptions.emitDeclarationOnly = true
      c.compilerOptions.declaration = true
      c.compilerOptions.outDir = `./out/${name(b)}`
      c.compilerOptions.tsBuildInfoFile = `./out/${name(b)}.tsbuildinfo`
      writeFileSync(p, JSON.stringify(c))
    }
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(solution))
    try {
      await run(process.execPath, [tsc, '-b', join(dir, 'tsconfig.json')], { cwd: root, maxBuffer: 16 << 20 })
    } catch (e) {
      const out = `${e.stdout ?? ''}${e.stderr ?? ''}`
      for (const m of out.matchAll(/(?:^|\n)(?:__test__\/\.snippets\/)?([\w.]+\.(?:mts|mjs|d\.ts))\((\d+),(\d+)\): error (TS\d+: [^\n]*)/g)) {
        const b = where.get(m[1])
        failures.push(b ? `${b.file}:${b.line + Number(m[2]) - 1}: ${m[4]}` : `${m[1]}:${m[2]}: ${m[4]}`)
      }
      if (failures.length === 0) failures.push(out.trim() || String(e))
    }
    expect(failures).toEqual([])
  })

  it('the runnable blocks run and exit 0', { timeout: 60_000 }, async () => {
    mkdirSync(dir, { recursive: true })
    const runnable = all.filter((b) => b.runnable)
    expect(runnable.length).toBeGreaterThan(0)
    for (const b of runnable) {
      const file = join(dir, `${name(b)}.run.${b.lang === 'ts' ? 'mts' : 'mjs'}`)
      writeFileSync(file, b.code)
      const args = b.lang === 'ts' ? ['--import', 'tsx', file] : [file]
      const { stdout } = await run(process.execPath, args, { cwd: root, timeout: 30_000 }).catch((e) => {
        throw new Error(`${b.file}:${b.line} failed: ${e.stderr || e.message}`)
      })
      expect(typeof stdout).toBe('string')
    }
  })
})

describe('links between the README and docs/', () => {
  it('every relative link points at a file that exists, and every docs page is one click from the README', () => {
    const broken = []
    for (const file of docs) {
      const text = readFileSync(join(root, file), 'utf8')
      for (const m of text.matchAll(/\]\((?!https?:|mailto:|#)([^)#\s]+)(#[^)]*)?\)/g)) {
        const target = join(root, dirname(file), m[1])
        if (!existsSync(target)) broken.push(`${file}: ${m[1]}`)
      }
    }
    expect(broken).toEqual([])
    const readme = readFileSync(join(root, 'README.md'), 'utf8')
    const linked = [...readme.matchAll(/\]\((docs\/[^)#\s]+\.md)/g)].map((m) => m[1])
    const pages = docs.filter((f) => f.startsWith('docs/'))
    expect(pages.filter((p) => !linked.includes(p)).map((p) => relative(root, join(root, p)))).toEqual([])
  })
})
