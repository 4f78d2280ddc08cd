// What a route answers when `manager.fetch` rejects: the manager could not
// give it a token, or the request itself failed.
import { NextResponse } from 'next/server'

const STATUS: Record<string, number> = {
  // No row for the user: they never connected their bank, or disconnected.
  NOT_CONNECTED: 409,
  // The provider refused the grant: the user must connect again.
  REAUTH_REQUIRED: 401,
}

export function errorResponse(e: unknown): NextResponse {
  const code = (e as { code?: string } | null)?.code ?? 'UNKNOWN'
  // The manager's errors carry a code and no secret; anything else (the API
  // unreachable, a bug) is logged so someone can tell which.
  if (code === 'UNKNOWN') console.error(e)
  const error = code === 'NOT_CONNECTED' ? 'no Tarabut connection for this user' : code === 'UNKNOWN' ? 'request failed' : 'token refresh failed'
  // Anything else is an outage (provider, store, Redis, network): worth retrying later.
  return NextResponse.json({ error, code }, { status: STATUS[code] ?? 503 })
}
