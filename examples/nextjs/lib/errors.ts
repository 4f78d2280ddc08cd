// What a route answers when the manager cannot give it a token.
import { NextResponse } from 'next/server'

const STATUS: Record<string, number> = {
  // No row for the user: they never connected their bank, or disconnected.
  NOT_CONNECTED: 409,
  // The provider refused the grant: the user must connect again.
  REAUTH_REQUIRED: 401,
}

export function tokenErrorResponse(e: unknown): NextResponse {
  const code = (e as { code?: string } | null)?.code ?? 'UNKNOWN'
  const error = code === 'NOT_CONNECTED' ? 'no Tarabut connection for this user' : 'token refresh failed'
  // Anything else is an outage (provider, store, Redis): worth retrying later.
  return NextResponse.json({ error, code }, { status: STATUS[code] ?? 503 })
}
