/**
 * Prometheus metrics of the agent (prom-client). Per-export counters are read
 * from the exports' own stats at scrape time, so the FUSE hot path only does
 * plain increments; latency histograms come from the exports' fixed buckets.
 */
import { Counter, Gauge, Histogram, type MetricValueWithName, Registry } from 'prom-client';
import type { ExportStats } from '../export/driver.js';
import { LATENCY_BUCKETS, type LatencyHistogram } from '../export/latency.js';

export interface ExportSample {
  id: string;
  state: string;
  /** The engine serving it (native, qemu). */
  engine: string;
  /** Its export type (fuse, nbd). */
  type: string | undefined;
  /** NBD exports: the clients connected now. */
  connections?: number | undefined;
  /** Request counters; undefined where the engine cannot count (the qemu engine: docs/engines.md). */
  stats: ExportStats | undefined;
}

export interface AgentMetrics {
  registry: Registry;
  /** Records one reconcile pass. */
  observePass(seconds: number, result: 'ok' | 'error'): void;
  text(): Promise<string>;
  contentType: string;
}

/** A histogram metric built from per-export LatencyHistograms at scrape time. */
function latencyMetric(
  name: string,
  help: string,
  pick: (s: ExportStats) => LatencyHistogram,
  exports: () => ExportSample[],
) {
  return {
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    get() {
      const values: MetricValueWithName<string>[] = [];
      for (const e of exports()) {
        if (!e.stats) continue;
        const h = pick(e.stats);
        const cum = h.cumulative();
        LATENCY_BUCKETS.forEach((le, i) => {
          values.push({ metricName: `${name}_bucket`, labels: { export: e.id, le }, value: cum[i]! });
        });
        values.push({ metricName: `${name}_bucket`, labels: { export: e.id, le: '+Inf' }, value: h.count });
        values.push({ metricName: `${name}_sum`, labels: { export: e.id }, value: h.sum });
        values.push({ metricName: `${name}_count`, labels: { export: e.id }, value: h.count });
      }
      return { name, help, type: 'histogram', aggregator: 'sum', values };
    },
  };
}

/** Creates the agent's metric registry over a provider of the current exports. */
export function createAgentMetrics(exports: () => ExportSample[]): AgentMetrics {
  const registry = new Registry();
  const counter = (name: string, help: string, value: (s: ExportStats) => number) =>
    new Counter({
      name,
      help,
      labelNames: ['export'],
      registers: [registry],
      collect() {
        this.reset();
        for (const e of exports()) if (e.stats) this.inc({ export: e.id }, value(e.stats));
      },
    });
  counter('blkexport_export_read_ops_total', 'Read requests served', (s) => s.reads);
  counter('blkexport_export_read_bytes_total', 'Bytes read', (s) => s.readBytes);
  counter('blkexport_export_write_ops_total', 'Write requests served', (s) => s.writes);
  counter('blkexport_export_write_bytes_total', 'Bytes written', (s) => s.writeBytes);
  counter('blkexport_export_flush_ops_total', 'Flush and fsync requests', (s) => s.flushes);
  counter('blkexport_export_errors_total', 'Requests answered with an I/O error', (s) => s.errors);
  new Gauge({
    name: 'blkexport_export_passthrough',
    help: "1 when the kernel serves the export's reads and writes from the image file (FUSE passthrough): the counters above miss them",
    labelNames: ['export'],
    registers: [registry],
    collect() {
      this.reset();
      for (const e of exports()) if (e.stats) this.set({ export: e.id }, e.stats.passthrough ? 1 : 0);
    },
  });
  new Gauge({
    name: 'blkexport_export_nbd_connections',
    help: 'NBD exports: clients connected to the export now (transmission phase)',
    labelNames: ['export'],
    registers: [registry],
    collect() {
      this.reset();
      for (const e of exports()) if (e.connections !== undefined) this.set({ export: e.id }, e.connections);
    },
  });
  new Gauge({
    name: 'blkexport_export_info',
    help: 'Always 1: which engine serves the export, and its type; the request counters exist only where counted is "yes"',
    labelNames: ['export', 'engine', 'type', 'counted'],
    registers: [registry],
    collect() {
      this.reset();
      for (const e of exports())
        this.set(
          { export: e.id, engine: e.engine, type: e.type ?? 'unknown', counted: e.stats ? 'yes' : 'no' },
          1,
        );
    },
  });
  new Gauge({
    name: 'blkexport_export_ready',
    help: '1 when the export is ready, 0 when pending or failed',
    labelNames: ['export', 'state'],
    registers: [registry],
    collect() {
      this.reset();
      for (const e of exports()) this.set({ export: e.id, state: e.state }, e.state === 'ready' ? 1 : 0);
    },
  });
  const asMetric = (m: ReturnType<typeof latencyMetric>) =>
    m as unknown as Parameters<Registry['registerMetric']>[0];
  registry.registerMetric(
    asMetric(
      latencyMetric('blkexport_export_read_seconds', 'Read request latency', (s) => s.readLatency, exports),
    ),
  );
  registry.registerMetric(
    asMetric(
      latencyMetric(
        'blkexport_export_write_seconds',
        'Write request latency',
        (s) => s.writeLatency,
        exports,
      ),
    ),
  );
  const passes = new Counter({
    name: 'blkexport_reconcile_passes_total',
    help: 'Reconcile passes',
    labelNames: ['result'],
    registers: [registry],
  });
  const durations = new Histogram({
    name: 'blkexport_reconcile_duration_seconds',
    help: 'Duration of reconcile passes',
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  return {
    registry,
    observePass(seconds, result) {
      passes.inc({ result });
      durations.observe(seconds);
    },
    text: () => registry.metrics(),
    contentType: registry.contentType,
  };
}
