import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['__test__/**/*.spec.{ts,mts,mjs,js}'],
    environment: 'node',
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Tests measure refresh counts and timing windows: keep files apart.
    pool: 'forks',
    fileParallelism: false,
  },
})
