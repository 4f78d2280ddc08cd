// `npm test` runs this first: the Redis specs, the Redis cargo tests, the
// e2e and the installed-package test start their own `redis-server` (and use
// `redis-cli`) on random loopback ports, so both must be on the PATH.
//
// Missing: as root on Debian or Ubuntu, installs the `redis-server` package
// with apt-get (one progress line; the full apt output only if it fails).
// Anywhere else: stops at once with one line naming the install command.
import { spawnSync } from 'node:child_process'
import { accessSync, constants, readFileSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const TOOLS = ['redis-server', 'redis-cli']

/** Whether the command `name` is in a directory of `PATH`. */
export function onPath(name, PATH = process.env.PATH ?? process.env.Path ?? '') {
  const names = process.platform === 'win32' ? ['.exe', '.cmd', '.bat', ''].map((ext) => name + ext) : [name]
  for (const dir of PATH.split(path.delimiter)) {
    if (!dir) continue
    for (const file of names) {
      try {
        accessSync(path.join(dir, file), constants.X_OK)
        return true
      } catch {}
    }
  }
  return false
}

function osRelease() {
  try {
    const fields = {}
    for (const line of readFileSync('/etc/os-release', 'utf8').split('\n')) {
      const m = line.match(/^([A-Z_]+)=("?)(.*)\2$/)
      if (m) fields[m[1]] = m[3]
    }
    return fields
  } catch {
    return {}
  }
}

/** The command that installs redis-server (and redis-cli) on this platform. */
export function installCommand(platform = process.platform, release = osRelease()) {
  if (platform === 'darwin') return 'brew install redis'
  if (platform === 'win32') return 'redis-server does not run on Windows: run the tests in WSL (sudo apt-get install redis-server)'
  const ids = `${release.ID ?? ''} ${release.ID_LIKE ?? ''}`.split(/\s+/)
  if (ids.includes('debian') || ids.includes('ubuntu')) return 'sudo apt-get install redis-server'
  if (ids.includes('alpine')) return 'apk add redis'
  if (ids.includes('arch')) return 'sudo pacman -S redis'
  if (ids.includes('amzn')) return 'sudo dnf install redis6'
  if (ids.includes('fedora') || ids.includes('rhel') || ids.includes('centos')) return 'sudo dnf install redis'
  if (ids.includes('suse') || ids.includes('opensuse')) return 'sudo zypper install redis'
  return 'install Redis 6 or later (redis-server and redis-cli) with your package manager'
}

function aptInstall() {
  const started = Date.now()
  process.stdout.write('redis-server is not on the PATH: installing it with apt-get ...')
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
  // The lock timeout: another apt run on the machine makes this wait, not fail.
  const apt = (args) => spawnSync('apt-get', ['-o', 'DPkg::Lock::Timeout=300', ...args], { env, encoding: 'utf8' })
  for (const args of [['update', '-qq'], ['install', '-y', '-qq', '--no-install-recommends', 'redis-server']]) {
    const r = apt(args)
    if (r.status !== 0) {
      process.stdout.write(' failed\n')
      process.stderr.write(`${r.error?.message ?? ''}${r.stdout ?? ''}${r.stderr ?? ''}`)
      return false
    }
  }
  process.stdout.write(` done in ${Math.round((Date.now() - started) / 1000)} s\n`)
  return true
}

export function ensureRedis() {
  const missing = () => TOOLS.filter((t) => !onPath(t))
  if (missing().length === 0) return true
  const release = osRelease()
  const ids = `${release.ID ?? ''} ${release.ID_LIKE ?? ''}`.split(/\s+/)
  const debian = process.platform === 'linux' && (ids.includes('debian') || ids.includes('ubuntu'))
  if (debian && process.getuid?.() === 0 && onPath('apt-get')) {
    if (aptInstall() && missing().length === 0) return true
  }
  console.error(`${missing().join(' and ')} not found on the PATH; the tests need it: ${installCommand(process.platform, release)}`)
  return false
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  process.exitCode = ensureRedis() ? 0 : 1
}
