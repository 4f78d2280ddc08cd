// Row 7, one fresh process per measurement: loads one competitor, makes one
// getValidToken call and prints `{ "ms": …, "cpuMs": …, "importMs": … }`:
// milliseconds from this process's start (performance.timeOrigin) to the
// answer, the CPU time all its threads used until then, and how much of the
// wall time loading the competitor's module took. Exits 1 on a wrong answer. Started
// without loaders (no tsx): the seed arrives pre-compiled.
// Usage: node cold-start-child.mjs <seed|addon|floor> <hot|refresh> [compiled seed URL]
const [name, path, seedUrl] = process.argv.slice(2)

const HOUR = 3_600_000
const presented =
  path === 'hot'
    ? { accessToken: 'at-valid', refreshToken: 'rt-1', expiresAt: new Date(Date.now() + HOUR) }
    : { accessToken: 'at-expired', refreshToken: 'rt-1', expiresAt: new Date(Date.now() - 1000) }
const refreshFn = async () => ({ accessToken: 'at-new', refreshToken: 'rt-2', expiresAt: new Date(Date.now() + HOUR) })

// What an app does on its first request: load the module, make one call.
const importStart = performance.now()
let getValidToken
if (name === 'addon') {
  // The process-wide singleton, as `import { getValidToken } from 'tarabut-token-manager'`.
  ;({ getValidToken } = await import('../index.mjs'))
} else if (name === 'seed' && seedUrl) {
  const { SeedTokenManager } = await import(seedUrl)
  const manager = new SeedTokenManager()
  getValidToken = (userId, token, fn) => manager.getValidToken(userId, token, fn)
} else if (name === 'floor') {
  // Node's own start and one promise: nothing is loaded.
  getValidToken = async (userId, token, fn) => {
    if (token.expiresAt.getTime() - Date.now() >= 300_000) return { accessToken: token.accessToken, shouldUpdate: false, expiresAt: token.expiresAt }
    const r = await fn({ userId, refreshToken: token.refreshToken })
    return { accessToken: r.accessToken, shouldUpdate: true, expiresAt: r.expiresAt }
  }
} else {
  console.error('usage: node cold-start-child.mjs <seed|addon|floor> <hot|refresh> [compiled seed URL]')
  process.exit(2)
}
if (path !== 'hot' && path !== 'refresh') process.exit(2)
const importMs = performance.now() - importStart

const answer = await getValidToken('user-1', presented, refreshFn)
const ms = performance.now()
const cpu = process.cpuUsage()
const want = path === 'hot' ? { accessToken: 'at-valid', shouldUpdate: false } : { accessToken: 'at-new', shouldUpdate: true }
if (answer.accessToken !== want.accessToken || answer.shouldUpdate !== want.shouldUpdate) {
  console.error(`${name} ${path}: wrong answer (shouldUpdate ${answer.shouldUpdate})`)
  process.exit(1)
}
console.log(JSON.stringify({ ms, cpuMs: (cpu.user + cpu.system) / 1000, importMs }))
