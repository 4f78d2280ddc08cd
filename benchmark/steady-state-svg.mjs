// The steady-state run as a picture: one panel per mode (refresh ahead on,
// off), request latency over time on a log scale (p50, p99, max per time
// bucket), calls that waited on a refresh as red dots, and the refreshes
// started per bucket as bars beneath. Plain SVG from string templates.

const W = 960
const PANEL_H = 250
const BARS_H = 44
const M = { left: 70, right: 20, top: 84, gap: 70 }
const PLOT_W = W - M.left - M.right
const COLORS = { p50: '#9e9e9e', p99: '#1f77b4', max: '#0b3c6e', waited: '#d62728', band: '#fde0dd', warm: '#f2f2f2', bars: '#ff7f0e' }

const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
const num = (v) => (Math.round(v * 10) / 10).toString()

function msLabel(ms) {
  if (ms >= 1000) return `${ms / 1000} s`
  if (ms >= 1) return `${ms} ms`
  return `${Math.round(ms * 1000)} µs`
}

/** A tick step for 0..span giving about `n` ticks: 1, 2 or 5 times a power of ten. */
function step(span, n) {
  const raw = span / n
  const p = 10 ** Math.floor(Math.log10(raw))
  return [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw)
}

/**
 * @param {object[]} runs   steady-state-child.mjs's results, refresh ahead on first
 * @param {{ bucketMs: number, delayMinMs: number, delayMaxMs: number, title: string }} o
 */
export function steadyStateSvg(runs, { bucketMs, delayMinMs, delayMaxMs, title }) {
  const durationS = Math.max(...runs.map((r) => r.durationS))
  const lifetimeS = runs[0].lifetimeS
  let top = 0
  let floor = Infinity
  for (const r of runs) {
    for (const p of r.points) {
      if (p.max !== null) top = Math.max(top, p.max)
      if (p.p50 !== null && p.p50 > 0) floor = Math.min(floor, p.p50)
    }
  }
  // Decades from below the fastest p50 to above the slowest call (and the refresh delay).
  const lo = 10 ** Math.floor(Math.log10(Math.min(floor, 0.01)))
  const hi = 10 ** Math.ceil(Math.log10(Math.max(top, delayMaxMs * 2)))
  const x = (s) => M.left + (Math.min(s, durationS) / durationS) * PLOT_W
  const panelTop = (k) => M.top + k * (PANEL_H + BARS_H + M.gap)
  const out = []
  const height = panelTop(runs.length) - M.gap + 40
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${height}" viewBox="0 0 ${W} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="${W}" height="${height}" fill="#ffffff"/>`,
    `<text x="${M.left}" y="22" font-size="15" font-weight="bold">${esc(title)}</text>`,
  )
  // Legend.
  const legend = [
    ['line', COLORS.p50, 'p50 latency'],
    ['line', COLORS.p99, 'p99 latency'],
    ['line', COLORS.max, 'slowest call'],
    ['dot', COLORS.waited, 'calls that waited on a refresh (the slowest)'],
    ['bar', COLORS.bars, 'refreshes started'],
  ]
  let lx = M.left
  for (const [kind, color, label] of legend) {
    if (kind === 'line') out.push(`<line x1="${lx}" y1="44" x2="${lx + 18}" y2="44" stroke="${color}" stroke-width="2"/>`)
    else if (kind === 'dot') out.push(`<circle cx="${lx + 9}" cy="44" r="4" fill="${color}"/>`)
    else out.push(`<rect x="${lx + 4}" y="38" width="10" height="10" fill="${color}"/>`)
    out.push(`<text x="${lx + 24}" y="48">${esc(label)}</text>`)
    // About 6.7 px a character at 12 px Helvetica.
    lx += 24 + label.length * 6.7 + 16
  }
  runs.forEach((r, k) => {
    const y0 = panelTop(k)
    const y = (ms) => y0 + PANEL_H - ((Math.log10(Math.max(ms, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo))) * PANEL_H
    const name = r.refreshAhead ? 'refresh ahead on (the default with store and refresher)' : 'refresh ahead off (refreshAhead: false)'
    out.push(`<text x="${M.left}" y="${y0 - 8}" font-size="13" font-weight="bold">${esc(name)}</text>`)
    out.push(
      `<text x="${W - M.right}" y="${y0 - 8}" text-anchor="end">${r.waited.toLocaleString('en-US')} of ${r.calls.toLocaleString('en-US')} calls after the first lifetime waited on a refresh</text>`,
    )
    // The first lifetime (warm-up: every user's first call refreshes), and the band a call waiting on a refresh lands in.
    out.push(`<rect x="${x(0)}" y="${y0}" width="${num(x(lifetimeS) - x(0))}" height="${PANEL_H}" fill="${COLORS.warm}"/>`)
    out.push(`<text x="${x(0) + 4}" y="${y0 + 14}" fill="#777">first lifetime: not counted</text>`)
    out.push(`<rect x="${M.left}" y="${num(y(delayMaxMs))}" width="${PLOT_W}" height="${num(y(delayMinMs) - y(delayMaxMs))}" fill="${COLORS.band}" opacity="0.7"/>`)
    // Latency axis (log).
    for (let d = lo; d <= hi * 1.0001; d *= 10) {
      out.push(`<line x1="${M.left}" y1="${num(y(d))}" x2="${W - M.right}" y2="${num(y(d))}" stroke="#e0e0e0"/>`)
      out.push(`<text x="${M.left - 6}" y="${num(y(d) + 4)}" text-anchor="end">${msLabel(Number(d.toPrecision(1)))}</text>`)
    }
    out.push(`<text transform="translate(16 ${y0 + PANEL_H / 2}) rotate(-90)" text-anchor="middle">latency (log)</text>`)
    // Lines: one point per bucket, at its middle.
    const mid = (p) => p.t + bucketMs / 2000
    for (const key of ['p50', 'p99', 'max']) {
      const pts = r.points.filter((p) => p[key] !== null).map((p) => `${num(x(mid(p)))},${num(y(p[key]))}`)
      out.push(`<polyline fill="none" stroke="${COLORS[key]}" stroke-width="${key === 'max' ? 1 : 1.6}" points="${pts.join(' ')}"/>`)
    }
    for (const p of r.points) {
      if (p.waited > 0) out.push(`<circle cx="${num(x(mid(p)))}" cy="${num(y(p.waitedMax))}" r="3" fill="${COLORS.waited}"><title>${p.waited} calls waited</title></circle>`)
    }
    // Over the lines, with a white halo so it stays readable.
    out.push(
      `<text x="${W - M.right - 4}" y="${num(y(delayMaxMs) + 14)}" text-anchor="end" fill="#a33" stroke="#ffffff" stroke-width="3" paint-order="stroke">refresh takes ${delayMinMs}–${delayMaxMs} ms: a call waiting on one lands here</text>`,
    )
    out.push(`<rect x="${M.left}" y="${y0}" width="${PLOT_W}" height="${PANEL_H}" fill="none" stroke="#444"/>`)
    // Refreshes started per bucket, beneath.
    const by = y0 + PANEL_H + 6
    const most = Math.max(1, ...r.points.map((p) => p.refreshes))
    const bw = Math.max(1, (bucketMs / 1000 / durationS) * PLOT_W - 0.5)
    for (const p of r.points) {
      if (p.refreshes === 0) continue
      const h = (p.refreshes / most) * (BARS_H - 8)
      out.push(`<rect x="${num(x(p.t))}" y="${num(by + BARS_H - 8 - h)}" width="${num(bw)}" height="${num(h)}" fill="${COLORS.bars}"/>`)
    }
    out.push(`<text x="${M.left - 6}" y="${by + 10}" text-anchor="end" font-size="10">${most.toLocaleString('en-US')}</text>`)
    out.push(`<text x="${M.left - 6}" y="${by + BARS_H - 8}" text-anchor="end" font-size="10">0</text>`)
    out.push(`<line x1="${M.left}" y1="${by + BARS_H - 8}" x2="${W - M.right}" y2="${by + BARS_H - 8}" stroke="#444"/>`)
    // Time axis.
    const s = step(durationS, 12)
    for (let t = 0; t <= durationS + 1e-9; t += s) {
      out.push(`<line x1="${num(x(t))}" y1="${by + BARS_H - 8}" x2="${num(x(t))}" y2="${by + BARS_H - 4}" stroke="#444"/>`)
      out.push(`<text x="${num(x(t))}" y="${by + BARS_H + 8}" text-anchor="middle">${num(t)} s</text>`)
    }
  })
  const foot = panelTop(runs.length) - M.gap + 30
  out.push(
    `<text x="${M.left}" y="${foot}" fill="#555">${esc(`${runs[0].users.toLocaleString('en-US')} users, each calling getToken once a second; tokens live ${lifetimeS} s; buckets of ${bucketMs} ms`)}</text>`,
  )
  out.push('</svg>')
  return `${out.join('\n')}\n`
}
