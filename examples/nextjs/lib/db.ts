// The app's token table, in SQLite. Several `next start` processes may share
// the file: WAL mode and a busy timeout let them write without SQLITE_BUSY.
import Database from 'better-sqlite3'

export interface TokenRow {
  accessToken: string
  refreshToken: string | null
  expiresAt: Date
}

const db = new Database(process.env.DATABASE_PATH ?? 'tokens.db')
db.pragma('journal_mode = WAL')
db.pragma('busy_timeout = 5000')
db.exec(`CREATE TABLE IF NOT EXISTS tarabut_tokens (
  user_id TEXT PRIMARY KEY,
  access_token TEXT NOT NULL,
  refresh_token TEXT,
  expires_at INTEGER NOT NULL
)`)

const select = db.prepare<[string], { access_token: string; refresh_token: string | null; expires_at: number }>(
  'SELECT access_token, refresh_token, expires_at FROM tarabut_tokens WHERE user_id = ?',
)
// Never let an older token overwrite a newer one (two instances, one row).
const upsert = db.prepare(
  `INSERT INTO tarabut_tokens (user_id, access_token, refresh_token, expires_at) VALUES (?, ?, ?, ?)
   ON CONFLICT(user_id) DO UPDATE SET access_token = excluded.access_token,
     refresh_token = COALESCE(excluded.refresh_token, tarabut_tokens.refresh_token), expires_at = excluded.expires_at
   WHERE excluded.expires_at >= tarabut_tokens.expires_at`,
)

export function readToken(userId: string): TokenRow | null {
  const row = select.get(userId)
  return row ? { accessToken: row.access_token, refreshToken: row.refresh_token, expiresAt: new Date(row.expires_at) } : null
}

/** The `shouldUpdate` contract: persist, in a transaction. */
export const saveToken = db.transaction((userId: string, t: { accessToken: string; expiresAt: Date; refreshToken?: string | null }) => {
  upsert.run(userId, t.accessToken, t.refreshToken ?? null, t.expiresAt.getTime())
})
