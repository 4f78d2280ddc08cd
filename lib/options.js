'use strict'
// Reading a caller's options object so that nobody else's code can change
// what it says: only the object's own properties count (a property someone
// put on Object.prototype, such as `redis` or `tokenUrl`, is not an
// option), each is read once, and the copy has no prototype, so neither a
// lookup of a missing key (here or by the native side, which looks keys up
// through the prototype chain) nor an assignment reaches Object.prototype.
// An unknown key is a TypeError naming it: a typo (`bufferTme`) must not
// fall back to a default in silence.

const { argError } = require('./errors.js')

/**
 * `value`'s own enumerable string-keyed properties, each read once, into a
 * null-prototype object; a key outside `knownKeys` is a TypeError naming
 * it (`${name}.${key}`). `value` must be an object (not checked here: the
 * caller words that error). A getter or Proxy that throws propagates (the
 * caller wraps it with `callerError`).
 * @param {object} value
 * @param {readonly string[]} knownKeys
 * @param {string} name the option's name in messages, e.g. 'options.redis'
 * @param {string} what whose options they are, in messages, e.g. 'TokenManager'
 * @returns {Record<string, any>}
 */
function ownOptions(value, knownKeys, name, what) {
  const copy = Object.create(null)
  for (const key of Object.keys(value)) {
    if (!knownKeys.includes(key)) throw argError(`${name}.${key}`, `is not a ${what} option (${knownKeys.join(', ')})`)
    copy[key] = value[key]
  }
  return copy
}

/**
 * The method `name` of a caller's object (a logger, a provider): found on
 * the object or a prototype of its own class, never on Object.prototype or
 * Function.prototype, where anyone could have put one. Undefined if none.
 */
function ownMethod(object, name) {
  for (let o = object; o !== null && o !== Object.prototype && o !== Function.prototype; o = Object.getPrototypeOf(o)) {
    const d = Object.getOwnPropertyDescriptor(o, name)
    if (d !== undefined) {
      const fn = d.get !== undefined ? d.get.call(object) : d.value
      return typeof fn === 'function' ? fn : undefined
    }
  }
  return undefined
}

module.exports = { ownOptions, ownMethod }
