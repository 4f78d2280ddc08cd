// The JS thread's own part of a stall (used by eviction-child.mjs and
// steady-state-child.mjs).
import { openSync, readSync } from 'node:fs'

// The process's own part of a stall. Wall-clock delays on a VM also hold the
// time the hypervisor ran something else on our vCPU ("steal"), which the
// process neither causes nor can avoid. The kernel leaves steal out of a
// thread's run time, so the JS thread's own part of a stretch of wall time
// is the time it ran plus the time it waited for a CPU (both from its
// schedstat, Linux): work, GC, and waiting behind the process's other
// threads count; the host's pauses do not. The kernel brings a running
// thread's run time up to date only at a scheduler tick or switch, and on
// getrusage: process.resourceUsage() is called first for that (and its
// page faults, process-wide, go into a slow call's anatomy). Without the
// file the figures are NaN.
const schedstat = (() => {
  try {
    return openSync('/proc/thread-self/schedstat', 'r')
  } catch {
    return null
  }
})()
const statBuf = Buffer.alloc(64)
/** [ran, waited for a CPU] in ms, and the process's page faults, so far (see above). */
export function ownParts() {
  const { minorPageFault, majorPageFault } = process.resourceUsage()
  if (schedstat === null) return [NaN, NaN, minorPageFault, majorPageFault]
  const n = readSync(schedstat, statBuf, 0, statBuf.length, 0)
  const [runNs, waitNs] = statBuf.toString('latin1', 0, n).split(' ')
  return [Number(runNs) / 1e6, Number(waitNs) / 1e6, minorPageFault, majorPageFault]
}
export function ownMs() {
  const [run, wait] = ownParts()
  return run + wait
}

/** The most own time (see ownMs) between two turns of a 1 ms timer: the
 *  longest the process itself can have held the event loop. */
export function ownDelay() {
  let wall = performance.now()
  let own = ownMs()
  let max = 0
  const timer = setInterval(() => {
    const w = performance.now()
    const o = ownMs()
    max = Math.max(max, Math.min(w - wall, o - own))
    wall = w
    own = o
  }, 1)
  return {
    take() {
      const m = max
      max = 0
      return m
    },
    stop: () => clearInterval(timer),
  }
}
