// ESM entry: the CommonJS module is the single instance, so `tokenManager`
// is the same object whether the app imports or requires this package.
import cjs from './index.js'

export const { TokenManager, TokenRefreshError, tokenManager, getValidToken, tarabutRefresher, oauth2Refresher } = cjs
export default cjs
