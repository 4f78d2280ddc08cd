// A bare RESP client for what the tests must do byte for byte: capture a
// channel's messages exactly as published, and publish arbitrary bytes
// (a forged or replayed notice), as anyone with access to Redis could.
import net from 'node:net'

const bulk = (b) => Buffer.concat([Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n')])
const command = (...args) => Buffer.concat([Buffer.from(`*${args.length}\r\n`), ...args.map((a) => bulk(Buffer.isBuffer(a) ? a : Buffer.from(String(a))))])

/** Parses one RESP2 value at `at`: [value, next] or null if incomplete. */
function parse(buf, at) {
  const end = buf.indexOf('\r\n', at)
  if (end < 0) return null
  const type = String.fromCharCode(buf[at])
  const line = buf.toString('latin1', at + 1, end)
  if (type === '+' || type === '-') return [line, end + 2]
  if (type === ':') return [Number(line), end + 2]
  if (type === '$') {
    const n = Number(line)
    if (n < 0) return [null, end + 2]
    if (buf.length < end + 2 + n + 2) return null
    return [buf.subarray(end + 2, end + 2 + n), end + 2 + n + 2]
  }
  if (type === '*') {
    const items = []
    let next = end + 2
    for (let i = 0; i < Number(line); i++) {
      const r = parse(buf, next)
      if (r === null) return null
      items.push(r[0])
      next = r[1]
    }
    return [items, next]
  }
  throw new Error(`unexpected RESP type ${type}`)
}

/** Subscribes to `channel`: `messages` fills with each message's bytes. */
export async function captureChannel(port, channel) {
  const socket = net.connect(port, '127.0.0.1')
  await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject))
  const messages = []
  let buf = Buffer.alloc(0)
  let subscribed
  const ready = new Promise((resolve) => (subscribed = resolve))
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    for (;;) {
      const r = parse(buf, 0)
      if (r === null) break
      buf = buf.subarray(r[1])
      const [kind, , payload] = r[0]
      if (String(kind) === 'subscribe') subscribed()
      else if (String(kind) === 'message') messages.push(Buffer.from(payload))
    }
  })
  socket.write(command('SUBSCRIBE', channel))
  await ready
  return { messages, close: () => socket.destroy() }
}

/** Publishes each of `payloads` (Buffers or strings) on `channel`, pipelined; resolves with the receiver counts. */
export async function publish(port, channel, payloads) {
  const socket = net.connect(port, '127.0.0.1')
  await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject))
  let buf = Buffer.alloc(0)
  const counts = []
  const done = new Promise((resolve, reject) => {
    socket.on('error', reject)
    socket.on('data', (d) => {
      buf = Buffer.concat([buf, d])
      for (;;) {
        const r = parse(buf, 0)
        if (r === null) break
        buf = buf.subarray(r[1])
        counts.push(r[0])
        if (counts.length === payloads.length) resolve(counts)
      }
    })
  })
  const CHUNK = 1_000
  for (let i = 0; i < payloads.length; i += CHUNK) {
    const batch = payloads.slice(i, i + CHUNK).map((p) => command('PUBLISH', channel, Buffer.isBuffer(p) ? p : Buffer.from(p)))
    if (!socket.write(Buffer.concat(batch))) await new Promise((r) => socket.once('drain', r))
  }
  const result = await done
  socket.destroy()
  return result
}

/**
 * A connection sending any command with binary arguments (Buffers or
 * strings), one reply per command in order: `send(...args)` resolves with
 * the reply (bulk strings as Buffers), or rejects with an error reply.
 */
export async function rawClient(port) {
  const socket = net.connect(port, '127.0.0.1')
  await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject))
  const waiting = []
  let buf = Buffer.alloc(0)
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d])
    for (;;) {
      const head = buf[0]
      const r = parse(buf, 0)
      if (r === null) break
      buf = buf.subarray(r[1])
      const w = waiting.shift()
      if (head === 0x2d) w.reject(new Error(r[0]))
      else w.resolve(r[0])
    }
  })
  socket.on('error', (e) => waiting.splice(0).forEach((w) => w.reject(e)))
  return {
    send: (...args) =>
      new Promise((resolve, reject) => {
        waiting.push({ resolve, reject })
        socket.write(command(...args))
      }),
    close: () => socket.destroy(),
  }
}
