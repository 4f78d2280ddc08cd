// GET /api/metrics — the token manager's metrics in the Prometheus text
// format, without OpenTelemetry. (Keep it off the public internet.)
import { tarabut } from '@/lib/tarabut'

export const runtime = 'nodejs'
export const dynamic = 'force-dynamic'

export async function GET() {
  const text = await tarabut().manager.metrics()
  return new Response(text, { headers: { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' } })
}
