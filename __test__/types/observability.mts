// Observability types: loggers that fit (pino, console), OpenTelemetry SDK
// providers, the channel messages, metrics().
import diagnostics_channel from 'node:diagnostics_channel'

import { MeterProvider } from '@opentelemetry/sdk-metrics'
import { BasicTracerProvider } from '@opentelemetry/sdk-trace-base'
import pino from 'pino'
import {
  TokenManager,
  type InvalidateMessage,
  type RedisFallbackMessage,
  type RefreshChannelContext,
  type StaleServedMessage,
  type TokenManagerLogger,
} from 'tarabut-token-manager'

new TokenManager({ logger: pino() })
new TokenManager({ logger: console })
const mine: TokenManagerLogger = { warn: ({ code }, message) => void [code, message], error: () => {} }
new TokenManager({ logger: mine })
new TokenManager({ openTelemetry: { meterProvider: new MeterProvider(), tracerProvider: new BasicTracerProvider() } })
new TokenManager({ openTelemetry: false })

const text: string = await new TokenManager().metrics()
void text

diagnostics_channel.tracingChannel<RefreshChannelContext>('tarabut-token-manager:refresh').subscribe({
  start: (ctx) => void ctx.reason,
  end: () => {},
  asyncStart: () => {},
  asyncEnd: (ctx) => {
    const line: string = `${ctx.userId} ${ctx.reason} ${ctx.refresher} ${ctx.coordination} ${ctx.waiters ?? 0} ${ctx.durationMs ?? 0} ${ctx.code ?? 'ok'}`
    void line
  },
  error: (ctx) => void ctx.error,
})
diagnostics_channel.subscribe('tarabut-token-manager:stale-served', (m) => void (m as StaleServedMessage).code)
diagnostics_channel.subscribe('tarabut-token-manager:redis-fallback', (m) => void (m as RedisFallbackMessage).phase)
diagnostics_channel.subscribe('tarabut-token-manager:invalidate', (m) => void (m as InvalidateMessage).scope)

// @ts-expect-error a logger needs error too
new TokenManager({ logger: { warn() {} } })
// @ts-expect-error true is not an option: pass providers, or false
new TokenManager({ openTelemetry: true })
