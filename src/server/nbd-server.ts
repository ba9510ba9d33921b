/**
 * Listens on TCP and/or Unix sockets and runs one Session per connection. `close()` is the
 * graceful shutdown: stop accepting, let every session finish what it has in flight, flush and
 * close.
 *
 * Each listener is either public or trusted. A public one applies the TLS mode and the access
 * policy; a trusted one (the owner-only socket inside the pool, which local commands such as
 * import use) serves every export in plain, with the store's own read-only flags only. A Unix
 * listener given a file mode refuses connections until the mode is set, so none slips in through
 * the window between bind and chmod.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { MAX_PAYLOAD } from '../nbd/constants.js';
import type { BlockSizes, TlsMode } from '../nbd/server-handshake.js';
import type { ExportCatalog } from '../store/types.js';
import { OperationError } from '../util/errors.js';
import type { Registry } from '../util/metrics.js';
import { ANONYMOUS, AccessPolicy } from './access.js';
import { BusyPoll } from './busy-poll.js';
import { BufferPool, allocateShifted } from '../util/buffer-pool.js';
import { resolveLimits, type ServerLimits } from './limits.js';
import { ServerMetrics } from './metrics.js';
import { Session } from './session.js';
import { TlsUpgrader, type TlsCredentials } from './tls.js';

export { DEFAULT_LIMITS, type ServerLimits } from './limits.js';

export const BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };

/** I/O buffers kept for reuse between requests, all connections together. */
const IDLE_BUFFER_BYTES = 64 * 1024 * 1024;
/** One read from any connection: up to this much arrives per read syscall. */
const READ_SCRATCH_BYTES = 256 * 1024;

export interface ServerTls {
  mode: TlsMode;
  /** Needed unless the mode is 'off'. */
  credentials?: TlsCredentials;
}

export interface ServerOptions {
  catalog: ExportCatalog;
  logger: Logger;
  limits?: Partial<ServerLimits>;
  /** The export a client gets when it asks for the empty name. */
  defaultExportName?: string;
  /** Where to count requests, connections and requests in flight; none when absent. */
  metrics?: Registry;
  /** TLS on public listeners; off when absent. */
  tls?: ServerTls;
  /** Read-only and allow-lists per export on public listeners; everything open when absent. */
  access?: AccessPolicy;
  /** libuv hands this process's file I/O to io_uring (UV_USE_IO_URING=1): busy polling may go on over a lone request. */
  fileIoOnIoUring?: boolean;
}

type Settings = Pick<ServerOptions, 'tls' | 'access' | 'limits'>;

interface Resolved {
  limits: ServerLimits;
  tlsMode: TlsMode;
  tls: TlsUpgrader | undefined;
  access: AccessPolicy;
}

function resolveSettings(settings: Settings): Resolved {
  const limits = resolveLimits(settings.limits);
  const tlsMode = settings.tls?.mode ?? 'off';
  const access = settings.access ?? AccessPolicy.OPEN;
  const credentials = settings.tls?.credentials;
  let tls: TlsUpgrader | undefined;
  if (tlsMode !== 'off') {
    if (credentials === undefined) throw new OperationError('EINVAL', `TLS mode "${tlsMode}" needs credentials`);
    tls = new TlsUpgrader(credentials, limits.handshakeTimeoutMs);
  }
  if (access.hasAllowLists && tls?.provesIdentities !== true) {
    throw new OperationError(
      'EINVAL',
      'allow-lists need clients that prove a name: enable TLS with a client CA (--tls-ca) or PSK keys (--tls-psk)',
    );
  }
  return { limits, tlsMode, tls, access };
}

/** Throws what the constructor would throw for these settings, without needing a catalog. */
export function checkServerSettings(settings: Settings): void {
  resolveSettings(settings);
}

export type ListenTarget = { host: string; port: number } | { path: string };

export interface ListenOptions {
  /** Serve every export in plain, bypassing TLS and the access policy (owner-only sockets). */
  trusted?: boolean;
  /** File mode of a Unix socket, e.g. 0o600. */
  mode?: number;
}

export class NbdServer {
  readonly #listeners: Server[] = [];
  readonly #sessions = new Set<Session>();
  /** Open connections per remote IP address. */
  readonly #perAddress = new Map<string, number>();
  readonly #options: ServerOptions;
  readonly #limits: ServerLimits;
  readonly #metrics: ServerMetrics | undefined;
  readonly #tlsMode: TlsMode;
  readonly #tls: TlsUpgrader | undefined;
  readonly #access: AccessPolicy;
  readonly #busyPoll: BusyPoll;
  readonly #buffers = new BufferPool(IDLE_BUFFER_BYTES);
  readonly #readScratch = allocateShifted(READ_SCRATCH_BYTES);
  #nextConnectionId = 1;
  #shuttingDown = false;

  constructor(options: ServerOptions) {
    this.#options = options;
    const resolved = resolveSettings(options);
    this.#limits = resolved.limits;
    this.#tlsMode = resolved.tlsMode;
    this.#tls = resolved.tls;
    this.#access = resolved.access;
    this.#busyPoll = new BusyPoll(this.#limits.busyPollUs, { overLoneRequest: options.fileIoOnIoUring === true });
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

  async listen(target: ListenTarget, options: ListenOptions = {}): Promise<AddressInfo | string> {
    let open = options.mode === undefined;
    const listener = createServer({ pauseOnConnect: true }, (socket) => {
      if (open) this.#accept(socket, options.trusted === true);
      else socket.destroy();
    });
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
    if ('path' in target && options.mode !== undefined) {
      await chmod(target.path, options.mode);
      open = true;
    }
    return listener.address() as AddressInfo | string;
  }

  async close(): Promise<void> {
    this.#shuttingDown = true;
    const listenersClosed = this.#listeners.map(
      (listener) => new Promise<void>((resolve) => listener.close(() => resolve())),
    );
    await Promise.all([...this.#sessions].map((session) => session.shutdown()));
    await Promise.all(listenersClosed);
    this.#busyPoll.stop();
  }

  #accept(socket: Socket, trusted: boolean): void {
    if (this.#shuttingDown) {
      socket.destroy();
      return;
    }
    const address = socket.remoteAddress;
    const refusal =
      this.#sessions.size >= this.#limits.maxConnections
        ? `the server has ${this.#limits.maxConnections} connections, its limit`
        : address !== undefined && (this.#perAddress.get(address) ?? 0) >= this.#limits.maxConnectionsPerAddress
          ? `${address} has ${this.#limits.maxConnectionsPerAddress} connections, the limit per address`
          : undefined;
    if (refusal !== undefined) {
      this.#options.logger.warn({ remote: address ?? 'unix', reason: refusal }, 'connection refused');
      socket.destroy();
      return;
    }
    const catalog = this.#options.catalog;
    const access = this.#access;
    const session = new Session(
      socket,
      {
        catalog,
        logger: this.#options.logger,
        limits: this.#limits,
        metrics: this.#metrics,
        busyPoll: this.#busyPoll,
        buffers: this.#buffers,
        readScratch: this.#readScratch,
        tls: trusted ? undefined : this.#tls,
        catalogFor: (peer) => access.view(catalog, peer),
        handshake: {
          catalog: trusted ? catalog : access.view(catalog, ANONYMOUS),
          defaultExportName: this.#options.defaultExportName ?? 'default',
          blockSizes: { ...BLOCK_SIZES, maximum: this.#limits.maxPayload },
          maxOptionLength: this.#limits.maxOptionLength,
          shuttingDown: () => this.#shuttingDown,
          tls: trusted ? 'off' : this.#tlsMode,
        },
      },
      this.#nextConnectionId++,
    );
    this.#sessions.add(session);
    if (address !== undefined) this.#perAddress.set(address, (this.#perAddress.get(address) ?? 0) + 1);
    void session.closed.then(() => {
      this.#sessions.delete(session);
      if (address === undefined) return;
      const left = (this.#perAddress.get(address) ?? 1) - 1;
      if (left === 0) this.#perAddress.delete(address);
      else this.#perAddress.set(address, left);
    });
  }
}
