// The app's token table, in SQLite, as the token manager's `store`. Several
// `next start` processes may share the file: WAL mode and a busy timeout let
// them write without SQLITE_BUSY.
import Database from 'better-sqlite3'
import type { TokenStore } from 'tarabut-token-manager'

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
// Compare-and-set: replace the row only if it still holds the token the
// manager last saw. No change means another instance wrote it first; the
// manager then reads it again and keeps whichever token expires later.
const replace = db.prepare<[string, string | null, number, string, string]>(
  'UPDATE tarabut_tokens SET access_token = ?, refresh_token = ?, expires_at = ? WHERE user_id = ? AND access_token = ?',
)
// No row known to the manager: write one, unless one appeared meanwhile.
const insert = db.prepare<[string, string, string | null, number]>(
  'INSERT INTO tarabut_tokens (user_id, access_token, refresh_token, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT(user_id) DO NOTHING',
)
const remove = db.prepare<[string]>('DELETE FROM tarabut_tokens WHERE user_id = ?')

export const tokenStore: TokenStore = {
  load(userId) {
    const row = select.get(userId)
    return row ? { accessToken: row.access_token, refreshToken: row.refresh_token, expiresAt: new Date(row.expires_at) } : null
  },
  save(userId, token, previous) {
    const expiresAt = token.expiresAt.getTime()
    const { changes } =
      previous === null
        ? insert.run(userId, token.accessToken, token.refreshToken, expiresAt)
        : replace.run(token.accessToken, token.refreshToken, expiresAt, userId, previous.accessToken)
    return changes === 1
  },
  delete(userId) {
    remove.run(userId)
  },
}
