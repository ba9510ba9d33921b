/**
 * Listens on TCP and/or Unix sockets and runs one Session per connection. `close()` is the
 * graceful shutdown: stop accepting, let every session finish what it has in flight, flush and
 * close.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { MAX_PAYLOAD } from '../nbd/constants.js';
import type { BlockSizes } from '../nbd/server-handshake.js';
import type { ExportCatalog } from '../store/types.js';
import type { Registry } from '../util/metrics.js';
import { ServerMetrics } from './metrics.js';
import { Session, type SessionLimits } from './session.js';

export interface ServerLimits extends SessionLimits {
  /** Option data larger than this is refused during the handshake. */
  maxOptionLength: number;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxInFlightRequests: 256,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxPayload: MAX_PAYLOAD,
  maxStatusDescriptors: 1 << 16,
  maxOptionLength: 64 * 1024,
};

export const BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };

export interface ServerOptions {
  catalog: ExportCatalog;
  logger: Logger;
  limits?: Partial<ServerLimits>;
  /** The export a client gets when it asks for the empty name. */
  defaultExportName?: string;
  /** Where to count requests, connections and requests in flight; none when absent. */
  metrics?: Registry;
}

export type ListenTarget = { host: string; port: number } | { path: string };

export class NbdServer {
  readonly #listeners: Server[] = [];
  readonly #sessions = new Set<Session>();
  readonly #options: ServerOptions;
  readonly #limits: ServerLimits;
  readonly #metrics: ServerMetrics | undefined;
  #nextConnectionId = 1;
  #shuttingDown = false;

  constructor(options: ServerOptions) {
    this.#options = options;
    this.#limits = { ...DEFAULT_LIMITS, ...options.limits };
    if (options.metrics !== undefined) {
      this.#metrics = new ServerMetrics(options.metrics);
      options.metrics.gauge('clonebd_nbd_connections', 'Open NBD connections', () => [[{}, this.#sessions.size]]);
      options.metrics.gauge('clonebd_nbd_requests_in_flight', 'NBD requests received and not yet answered', () => [
        [{}, [...this.#sessions].reduce((sum, session) => sum + session.inFlightRequests, 0)],
      ]);
    }
  }

  get connectionCount(): number {
    return this.#sessions.size;
  }

  /** Connections attached to an export. */
  clientsOf(exportName: string): number {
    let count = 0;
    for (const session of this.#sessions) if (session.exportName === exportName) count++;
    return count;
  }

  /** Ends every connection to an export the graceful way: in-flight requests finish first. */
  async disconnect(exportName: string): Promise<void> {
    const attached = [...this.#sessions].filter((session) => session.exportName === exportName);
    await Promise.all(attached.map((session) => session.shutdown()));
  }

  async listen(target: ListenTarget): Promise<AddressInfo | string> {
    const listener = createServer((socket) => this.#accept(socket));
    if ('path' in target) await unlink(target.path).catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      listener.once('error', reject);
      const onListening = (): void => {
        listener.off('error', reject);
        resolve();
      };
      if ('path' in target) listener.listen(target.path, onListening);
      else listener.listen(target.port, target.host, onListening);
    });
    listener.on('error', (error) => this.#options.logger.error({ err: error }, 'listener error'));
    this.#listeners.push(listener);
    return listener.address() as AddressInfo | string;
  }

  async close(): Promise<void> {
    this.#shuttingDown = true;
    const listenersClosed = this.#listeners.map(
      (listener) => new Promise<void>((resolve) => listener.close(() => resolve())),
    );
    await Promise.all([...this.#sessions].map((session) => session.shutdown()));
    await Promise.all(listenersClosed);
  }

  #accept(socket: Socket): void {
    if (this.#shuttingDown) {
      socket.destroy();
      return;
    }
    const session = new Session(
      socket,
      {
        catalog: this.#options.catalog,
        logger: this.#options.logger,
        limits: this.#limits,
        metrics: this.#metrics,
        handshake: {
          catalog: this.#options.catalog,
          defaultExportName: this.#options.defaultExportName ?? 'default',
          blockSizes: BLOCK_SIZES,
          maxOptionLength: this.#limits.maxOptionLength,
          shuttingDown: () => this.#shuttingDown,
        },
      },
      this.#nextConnectionId++,
    );
    this.#sessions.add(session);
    void session.closed.then(() => this.#sessions.delete(session));
  }
}
