/**
 * NBD request metrics per operation and export. A session asks for its export's handles once,
 * when transmission starts; recording a request is then two additions and a bucket search.
 */
import * as C from '../nbd/constants.js';
import type { CounterChild, HistogramChild, Registry } from '../util/metrics.js';

const OPERATION_NAMES: Readonly<Record<number, string>> = {
  [C.NBD_CMD_READ]: 'read',
  [C.NBD_CMD_WRITE]: 'write',
  [C.NBD_CMD_FLUSH]: 'flush',
  [C.NBD_CMD_TRIM]: 'trim',
  [C.NBD_CMD_CACHE]: 'cache',
  [C.NBD_CMD_WRITE_ZEROES]: 'write_zeroes',
  [C.NBD_CMD_BLOCK_STATUS]: 'block_status',
};

const LATENCY_BOUNDS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

interface OperationHandles {
  ok: CounterChild;
  error: CounterChild;
  bytes: CounterChild;
  latency: HistogramChild;
}

export class ExportMetrics {
  readonly #byType = new Map<number, OperationHandles>();

  constructor(handles: Map<number, OperationHandles>) {
    this.#byType = handles;
  }

  record(type: number, bytes: number, seconds: number, failed: boolean): void {
    const handles = this.#byType.get(type);
    if (handles === undefined) return;
    (failed ? handles.error : handles.ok).inc();
    if (!failed) handles.bytes.inc(bytes);
    handles.latency.observe(seconds);
  }
}

export class ServerMetrics {
  readonly #requests;
  readonly #bytes;
  readonly #latency;
  readonly #exports = new Map<string, ExportMetrics>();

  constructor(registry: Registry) {
    this.#requests = registry.counter('clonebd_nbd_requests_total', 'NBD requests answered, by operation, export and result');
    this.#bytes = registry.counter('clonebd_nbd_bytes_total', 'Bytes moved by successful NBD requests, by operation and export');
    this.#latency = registry.histogram(
      'clonebd_nbd_request_duration_seconds',
      'Time from receiving an NBD request to queueing its reply',
      LATENCY_BOUNDS,
    );
  }

  forExport(name: string): ExportMetrics {
    let metrics = this.#exports.get(name);
    if (metrics === undefined) {
      const handles = new Map<number, OperationHandles>();
      for (const [type, op] of Object.entries(OPERATION_NAMES)) {
        handles.set(Number(type), {
          ok: this.#requests.labels({ op, export: name, result: 'ok' }),
          error: this.#requests.labels({ op, export: name, result: 'error' }),
          bytes: this.#bytes.labels({ op, export: name }),
          latency: this.#latency.labels({ op, export: name }),
        });
      }
      metrics = new ExportMetrics(handles);
      this.#exports.set(name, metrics);
    }
    return metrics;
  }
}
