// GET /api/accounts?userId=… — the user's accounts from Tarabut. The
// manager attaches a valid token (loaded from the table, refreshed and saved
// as needed) and, if the API answers 401, refreshes and sends once more.
// (A real app takes userId from the session.)
import { NextResponse } from 'next/server'

import { errorResponse } from '@/lib/errors'
import { tarabut } from '@/lib/tarabut'

export const runtime = 'nodejs'
export const dynamic = 'force-dynamic'

export async function GET(request: Request) {
  const userId = new URL(request.url).searchParams.get('userId')
  if (!userId) return NextResponse.json({ error: 'userId is required' }, { status: 400 })

  try {
    const { manager, apiUrl } = tarabut()
    const res = await manager.fetch(userId, `${apiUrl}/accounts`, {
      // Tarabut's APIs name the customer in this header as well as in the token.
      headers: { 'X-TG-CustomerUserId': userId },
      cache: 'no-store',
    })
    if (!res.ok) return NextResponse.json({ error: `accounts API answered ${res.status}` }, { status: 502 })
    return NextResponse.json(await res.json())
  } catch (e) {
    return errorResponse(e)
  }
}
