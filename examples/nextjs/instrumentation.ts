// Next.js runs register() once per server process, before any route. The
// OpenTelemetry SDK registered here is what tarabut-token-manager reports to
// (no code in the routes): its metrics are served by the Prometheus
// exporter on its own port, OTEL_EXPORTER_PROMETHEUS_HOST and
// OTEL_EXPORTER_PROMETHEUS_PORT (default 9464), at /metrics.
export async function register() {
  if (process.env.NEXT_RUNTIME !== 'nodejs') return
  const { metrics } = await import('@opentelemetry/api')
  const { MeterProvider } = await import('@opentelemetry/sdk-metrics')
  const { PrometheusExporter } = await import('@opentelemetry/exporter-prometheus')
  metrics.setGlobalMeterProvider(new MeterProvider({ readers: [new PrometheusExporter()] }))
}
