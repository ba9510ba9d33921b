import { afterEach, describe, expect, it } from 'vitest';
import { requireTool, runOk } from '../helpers/tools.js';
import { startServerProcess, stopAllServerProcesses } from '../helpers/server-process.js';

afterEach(stopAllServerProcesses);

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text format strictly enough to fail on malformed lines. */
function parseExposition(text: string): Sample[] {
  const samples: Sample[] = [];
  const declared = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const type = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$/.exec(line);
    if (type !== null) {
      declared.set(type[1]!, type[2]!);
      continue;
    }
    if (/^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+$/.test(line)) continue;
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+-]+|\+Inf)$/.exec(line);
    if (sample === null) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    for (const pair of (sample[2] ?? '').match(/[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"/g) ?? []) {
      const at = pair.indexOf('=');
      labels[pair.slice(0, at)] = pair.slice(at + 2, -1);
    }
    const family = sample[1]!.replace(/_(bucket|sum|count)$/, '');
    if (!declared.has(sample[1]!) && !declared.has(family)) throw new Error(`sample before its TYPE: ${line}`);
    samples.push({ name: sample[1]!, labels, value: Number(sample[3]) });
  }
  return samples;
}

function value(samples: Sample[], name: string, labels: Record<string, string>): number {
  const found = samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  return found?.value ?? 0;
}

describe('Prometheus metrics endpoint', () => {
  it('is off unless asked for', async () => {
    const server = await startServerProcess();
    const listening = await server.waitForLog((line) => line.msg === 'listening');
    expect(listening.metrics).toBeUndefined();
  });

  it('parses as Prometheus text and its counters move with traffic', async (ctx) => {
    const qemuIo = requireTool(ctx, 'qemu-io');
    const server = await startServerProcess({
      args: ['--metrics', '127.0.0.1:0'],
      prepare: async (pool) => pool.createVolume('vol', 8 << 20),
    });
    const listening = await server.waitForLog((line) => line.msg === 'listening');
    const endpoint = listening.metrics as { address: string; port: number };
    expect(endpoint.address).toBe('127.0.0.1');
    const scrape = async (): Promise<Sample[]> => {
      const response = await fetch(`http://127.0.0.1:${endpoint.port}/metrics`);
      expect(response.status).toBe(200);
      return parseExposition(await response.text());
    };

    const before = await scrape();
    expect(value(before, 'clonebd_volumes', { kind: 'volume' })).toBe(1);
    expect(value(before, 'clonebd_nbd_requests_total', { op: 'write', export: 'vol' })).toBe(0);

    await runOk(qemuIo, ['-f', 'raw', server.uri('vol'), '-c', 'write -P 7 0 1M', '-c', 'read -P 7 0 256k', '-c', 'flush']);

    const after = await scrape();
    expect(value(after, 'clonebd_nbd_requests_total', { op: 'write', export: 'vol', result: 'ok' })).toBeGreaterThanOrEqual(1);
    expect(value(after, 'clonebd_nbd_bytes_total', { op: 'write', export: 'vol' })).toBe(1 << 20);
    expect(value(after, 'clonebd_nbd_bytes_total', { op: 'read', export: 'vol' })).toBe(256 << 10);
    expect(value(after, 'clonebd_nbd_request_duration_seconds_count', { op: 'read', export: 'vol' })).toBeGreaterThanOrEqual(1);
    expect(value(after, 'clonebd_pool_bytes', { state: 'used' })).toBeGreaterThanOrEqual(1 << 20);
    expect(value(after, 'clonebd_journal_bytes', {})).toBeGreaterThan(0);
  });
});
