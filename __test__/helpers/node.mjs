// A `node` child process for tests that must see what a process does as a
// whole: its exit status or signal, and everything it printed (a Rust panic
// is text on stderr).
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

/** The package's root directory, with a trailing separator. */
export const PKG = fileURLToPath(new URL('../..', import.meta.url))

/** Runs `node ...args` in the package root; resolves when it exits. */
export function runNode(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: PKG, stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.on('data', (d) => (out += d))
    child.stderr.on('data', (d) => (err += d))
    child.on('error', reject)
    child.on('exit', (code, signal) => resolve({ code, signal, out, err }))
  })
}
