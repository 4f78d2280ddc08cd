// GET /api/accounts?userId=… — the user's accounts from Tarabut, with a token
// the addon keeps valid. (A real app takes userId from the session.)
import { NextResponse } from 'next/server'

import { readToken, saveToken } from '@/lib/db'
import { tarabut } from '@/lib/tarabut'

export const runtime = 'nodejs'
export const dynamic = 'force-dynamic'

async function fetchAccounts(userId: string, accessToken: string): Promise<Response> {
  return fetch(`${tarabut().apiUrl}/accounts`, {
    headers: { Authorization: `Bearer ${accessToken}`, 'X-TG-CustomerUserId': userId },
    cache: 'no-store',
  })
}

export async function GET(request: Request) {
  const userId = new URL(request.url).searchParams.get('userId')
  if (!userId) return NextResponse.json({ error: 'userId is required' }, { status: 400 })
  const row = readToken(userId)
  if (!row) return NextResponse.json({ error: 'no Tarabut connection for this user' }, { status: 404 })

  try {
    const { manager, refresher } = tarabut()
    let token = await manager.getValidToken(userId, row, refresher)
    if (token.shouldUpdate) saveToken(userId, token)
    let res = await fetchAccounts(userId, token.accessToken)
    if (res.status === 401) {
      // The API rejected a token we thought valid: mark it bad, retry once.
      manager.invalidate(userId, token.accessToken)
      token = await manager.getValidToken(userId, { ...row, accessToken: token.accessToken, expiresAt: token.expiresAt }, refresher)
      if (token.shouldUpdate) saveToken(userId, token)
      res = await fetchAccounts(userId, token.accessToken)
    }
    if (!res.ok) return NextResponse.json({ error: `accounts API answered ${res.status}` }, { status: 502 })
    return NextResponse.json(await res.json())
  } catch (e) {
    const code = (e as { code?: string }).code ?? 'UNKNOWN'
    const status = code === 'REAUTH_REQUIRED' ? 401 : 503
    return NextResponse.json({ error: 'token refresh failed', code }, { status })
  }
}
