'use strict'
// Decodes the answers of the engine's bound functions: the calls every
// getValidToken makes, at a fraction of a napi-rs method's cost. The
// encoders are in src/binding/protocol.rs; this is the one decoder.
//
// | call                                      | answer                     | decoded                                       |
// |-------------------------------------------|----------------------------|-----------------------------------------------|
// | isFresh(expiresAtMs, nowMs)               | true / false               | used as is (the hot path)                     |
// | begin(userId, access, refresh, expiresAt, | null                       | { kind: 'presented' }: hand it back           |
// |   nowMs)                                  |                            |                                               |
// |                                           | n >= 0                     | { kind: 'lead', flightId: n, refreshToken }   |
// |                                           |                            |   (refreshToken: the one the caller passed)   |
// |                                           | n < 0                      | { kind: 'join', flightId: -n - 1 }            |
// |                                           | { kind: 'lead', flightId,  | { kind: 'lead', flightId, refreshToken }      |
// |                                           |   refreshToken? }          |   (a newer one the engine holds)              |
// |                                           | { kind: 'held', ... }      | { kind: 'held', token: Issued }               |
// | complete(userId, flightId, access,        | e > 0                      | Issued, expiresAtMs e, refreshToken handed    |
// |   refresh, expiresAtMs, expiresIn, nowMs) | e < 0                      | Issued, expiresAtMs -e, no refreshToken       |
//
// `nowMs`: the caller's clock (lib/manager.js reads it); the engine has none.
// Issued: { accessToken, refreshToken, expiresAtMs, shouldUpdate }.
// Errors are thrown by the native side with a stable `code`.

/** @typedef {{ accessToken: string, refreshToken: string | null, expiresAtMs: number, shouldUpdate: boolean }} Issued */
/**
 * @typedef {{ kind: 'presented' }
 *   | { kind: 'held', token: Issued }
 *   | { kind: 'join', flightId: number }
 *   | { kind: 'lead', flightId: number, refreshToken: string | null }} Plan
 */

/** @type {Plan} */
const PRESENTED = Object.freeze({ kind: 'presented' })

/**
 * `begin`'s answer as a Plan. `refreshToken`: the one the caller passed.
 * @returns {Plan}
 */
function decodePlan(answer, refreshToken) {
  if (answer === null) return PRESENTED
  if (typeof answer === 'number') {
    return answer >= 0 ? { kind: 'lead', flightId: answer, refreshToken } : { kind: 'join', flightId: -answer - 1 }
  }
  if (answer.kind === 'lead') return { kind: 'lead', flightId: answer.flightId, refreshToken: answer.refreshToken ?? null }
  return {
    kind: 'held',
    token: {
      accessToken: answer.accessToken,
      refreshToken: answer.refreshToken ?? null,
      expiresAtMs: answer.expiresAtMs,
      shouldUpdate: answer.shouldUpdate,
    },
  }
}

/**
 * `complete`'s answer as the leader's Issued token: the leader passed the
 * tokens, so only the expiry and whether the refresh token is handed cross.
 * @returns {Issued}
 */
function decodeIssued(answer, accessToken, refreshToken) {
  return { accessToken, refreshToken: answer > 0 ? refreshToken : null, expiresAtMs: Math.abs(answer), shouldUpdate: true }
}

/**
 * The engine's functions, bound to `bindingManager`, with decoded answers.
 * `isFresh` is the native function itself: the hot path pays no wrapper.
 */
function bindProtocol(bindingManager) {
  const { isFresh, begin, complete } = bindingManager.bindProtocol()
  return {
    isFresh,
    /** @returns {Plan} */
    begin: (userId, accessToken, refreshToken, expiresAtMs, nowMs) => decodePlan(begin(userId, accessToken, refreshToken, expiresAtMs, nowMs), refreshToken),
    /** @returns {Issued} */
    complete: (userId, flightId, accessToken, refreshToken, expiresAtMs, expiresIn, nowMs) =>
      decodeIssued(complete(userId, flightId, accessToken, refreshToken, expiresAtMs, expiresIn, nowMs), accessToken, refreshToken),
  }
}

module.exports = { bindProtocol, decodePlan, decodeIssued }
