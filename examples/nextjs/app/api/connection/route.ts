// DELETE /api/connection?userId=… — the user disconnects their bank: the
// manager forgets their token in every instance (through Redis, if set) and
// deletes their row. Their routes then answer 409 NOT_CONNECTED until they
// connect again. (Tarabut's client-credentials tokens have no refresh token
// to revoke, so `forget` rather than `revoke`.)
import { NextResponse } from 'next/server'

import { tarabut } from '@/lib/tarabut'

export const runtime = 'nodejs'
export const dynamic = 'force-dynamic'

export async function DELETE(request: Request) {
  const userId = new URL(request.url).searchParams.get('userId')
  if (!userId) return NextResponse.json({ error: 'userId is required' }, { status: 400 })
  await tarabut().manager.forget(userId)
  return new Response(null, { status: 204 })
}
