/** @type {import('next').NextConfig} */
export default {
  // A native addon: Node must require it at run time. Without this,
  // Turbopack refuses the .node file ("not placeable in ESM chunks").
  serverExternalPackages: ['tarabut-token-manager'],
  // Deploy without node_modules: `.next/standalone` holds server.js and every
  // file it needs, the addon's .node file included (traced by Next).
  output: 'standalone',
}
