// Preloaded (`node --require`) to run the package as if the packages named
// in HIDE_MODULES (comma-separated) were not installed for it. Installed
// packages still find their own dependencies (prom-client has its own
// @opentelemetry/api), as under pnpm when an optional peer dependency is
// left out.
'use strict'
const Module = require('node:module')

const hidden = (process.env.HIDE_MODULES ?? '').split(',').filter(Boolean)
const resolve = Module._resolveFilename
Module._resolveFilename = function (request, parent, ...rest) {
  const fromDependency = /[\\/]node_modules[\\/]/.test(parent?.filename ?? '')
  if (!fromDependency && hidden.some((name) => request === name || request.startsWith(`${name}/`))) {
    throw Object.assign(new Error(`Cannot find module '${request}'`), { code: 'MODULE_NOT_FOUND' })
  }
  return resolve.call(this, request, parent, ...rest)
}
