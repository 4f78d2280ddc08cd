// The CommonJS entry has the same types.
import tm = require('tarabut-token-manager')

const m: tm.TokenManager = new tm.TokenManager()
void m.getValidToken('u', { accessToken: 'a', expiresAt: new Date() }, async () => ({ accessToken: 'b', expiresIn: 60 }))
void tm.getValidToken
