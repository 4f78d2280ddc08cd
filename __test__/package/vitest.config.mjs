// `npm run test:package` (after `npm run package`): the packed tarballs.
import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    root: new URL('../..', import.meta.url).pathname,
    include: ['__test__/package/*.test.mjs'],
    environment: 'node',
    testTimeout: 60_000,
    // Fetching the Node binaries the first time (about 50 MB each).
    hookTimeout: 600_000,
    pool: 'forks',
    fileParallelism: false,
  },
})
