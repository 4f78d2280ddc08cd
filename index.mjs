// ESM entry: the CommonJS module is the single instance, so `tokenManager`
// is the same object whether the app imports or requires this package.
// Loaded with require, not `import cjs from './index.js'`: importing CommonJS
// makes Node scan its source for export names on every start, a cost that
// lands on cold starts (BENCHMARKS.md, row 7). The names are listed here
// instead.
import { createRequire } from 'node:module'

const cjs = createRequire(import.meta.url)('./index.js')

export const { TokenManager, TokenRefreshError, tokenManager, getValidToken, tarabutRefresher, oauth2Refresher } = cjs
export default cjs
