/**
 * The Prometheus endpoint of `clonebd serve --metrics HOST:PORT`: GET /metrics renders the
 * registry after refreshing the pool figures, which are too costly to keep current on every
 * change.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Pool, PoolUsage } from '../store/index.js';
import { Registry } from '../util/metrics.js';
import type { HostPort } from './parse.js';

export function poolGauges(registry: Registry, pool: Pool): () => Promise<void> {
  let usage: PoolUsage | undefined;
  const kinds = (): Iterable<[Record<string, string>, number]> => {
    const volumes = pool.volumes();
    return [
      [{ kind: 'volume' }, volumes.filter((v) => v.kind === 'volume' && v.parent === null).length],
      [{ kind: 'clone' }, volumes.filter((v) => v.kind === 'volume' && v.parent !== null).length],
      [{ kind: 'snapshot' }, volumes.filter((v) => v.kind === 'snapshot').length],
    ];
  };
  registry.gauge('clonebd_volumes', 'Volumes, clones and snapshots in the pool', kinds);
  registry.gauge('clonebd_pool_bytes', 'Pool capacity, bytes used by layer files, and bytes free', () =>
    usage === undefined
      ? []
      : [
          [{ state: 'capacity' }, usage.capacityBytes],
          [{ state: 'used' }, usage.usedBytes],
          [{ state: 'free' }, usage.freeBytes],
        ],
  );
  registry.gauge('clonebd_pool_layers', 'Layer files in the pool', () => (usage === undefined ? [] : [[{}, usage.layers]]));
  registry.gauge('clonebd_journal_bytes', 'Metadata journal since the last checkpoint (what a restart replays)', () =>
    usage === undefined ? [] : [[{}, usage.journalBytes]],
  );
  return async () => {
    usage = await pool.usage();
  };
}

export async function startMetricsEndpoint(
  address: HostPort,
  registry: Registry,
  refresh: () => Promise<void>,
): Promise<{ server: Server; address: AddressInfo }> {
  const server = createServer((request, response) => {
    if (request.method !== 'GET' || request.url !== '/metrics') {
      response.writeHead(404).end('see /metrics\n');
      return;
    }
    refresh().then(
      () => {
        response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
        response.end(registry.render());
      },
      (error: unknown) => {
        response.writeHead(500).end(`${error instanceof Error ? error.message : String(error)}\n`);
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(address.port, address.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return { server, address: server.address() as AddressInfo };
}
