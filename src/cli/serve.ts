/**
 * `clonebd serve`: opens (or creates) the pool and serves every volume and snapshot in it over
 * NBD until SIGTERM or SIGINT, then shuts down gracefully.
 *
 * The TCP listener and `--socket` are public: the TLS mode and the access policy apply there. The
 * NBD socket inside the pool is owner-only (0600), like the admin socket, and trusted.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { mkdir, readdir } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { AddressInfo } from 'node:net';
import { AdminServer } from '../control/admin-server.js';
import {
  AccessPolicy,
  NbdServer,
  checkServerSettings,
  loadAccessFile,
  loadTlsCredentials,
  parseAccessConfig,
  type ServerLimits,
  type ServerTls,
  type TlsFiles,
  type TlsMode,
} from '../server/index.js';
import { nodeFileLayer, Pool, SyncIoPolicy } from '../store/index.js';
import { OperationError } from '../util/errors.js';
import { Registry } from '../util/metrics.js';
import { poolGauges, startMetricsEndpoint } from './metrics-endpoint.js';
import { parseListen, parseSize, type HostPort } from './parse.js';
import { fileIoOnIoUring } from './server-env.js';
import { stopSignal } from './stop-signal.js';

export const DEFAULT_LISTEN = '127.0.0.1:10809';
export const DEFAULT_VOLUME_NAME = 'default';
export const DEFAULT_VOLUME_SIZE = 2 ** 30;

/** The admin API's socket lives inside the pool, so finding the pool finds the daemon. */
export function adminSocketPath(poolDir: string): string {
  return join(poolDir, 'admin.sock');
}

/** An NBD socket inside the pool, so local commands (import, export) reach the exports too. */
export function nbdSocketPath(poolDir: string): string {
  return join(poolDir, 'nbd.sock');
}

/** The pool every command uses unless told otherwise. */
export function defaultPoolDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.CLONEBD_POOL) return env.CLONEBD_POOL;
  const dataHome = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(dataHome, 'clonebd', 'pool');
}

export interface ServeOptions {
  pool: string;
  listen: string;
  socket?: string;
  defaultVolume: boolean;
  /** Serve Prometheus metrics here; off when absent. */
  metrics?: string;
  /** Bytes the pool may hold; the file system's free space when absent. */
  capacity?: number;
  /** Also serve the admin API over TCP here, to requests carrying `adminToken`. */
  adminListen?: string;
  adminToken?: string;
  /** Default 'off'. */
  tls?: TlsMode;
  tlsFiles?: TlsFiles;
  /** Path of a JSON access file, or the access configuration itself (from a config file). */
  access?: unknown;
  limits?: Partial<ServerLimits>;
}

export const TLS_MODES = ['off', 'optional', 'require'] as const;

// Coercions for serve's limit options: each turns what yargs parsed into the value the limit takes.

export function sizeArg(text: string | undefined): number | undefined {
  return text === undefined ? undefined : parseSize(String(text));
}

export function countArg(option: string): (value: unknown) => number | undefined {
  return (value) => {
    if (value === undefined) return undefined;
    if (typeof value !== 'number' || !Number.isInteger(value)) throw new Error(`invalid ${option} "${String(value)}": expected a whole number`);
    return value;
  };
}

/** A duration in seconds (fractions allowed), as milliseconds. */
export function secondsArg(option: string): (value: unknown) => number | undefined {
  return (value) => {
    if (value === undefined) return undefined;
    const seconds = typeof value === 'number' ? value : typeof value === 'string' && value.trim() !== '' ? Number(value) : NaN;
    if (!Number.isFinite(seconds) || seconds < 0) {
      throw new Error(`invalid ${option} "${String(value)}": expected seconds, e.g. 10 or 0.5 (0 turns it off)`);
    }
    return Math.round(seconds * 1000);
  };
}

/** The entries whose value was given, so the defaults fill in the rest. */
export function definedOnly<T extends object>(values: { [K in keyof T]: T[K] | undefined }): Partial<T> {
  return Object.fromEntries(Object.entries(values).filter(([, value]) => value !== undefined)) as Partial<T>;
}

async function tlsSettings(options: ServeOptions): Promise<ServerTls> {
  const mode = options.tls ?? 'off';
  const files = options.tlsFiles ?? {};
  const given = Object.entries(files).filter(([, path]) => path !== undefined).map(([name]) => `--tls-${name}`);
  if (mode === 'off') {
    if (given.length > 0) throw new OperationError('EINVAL', `${given.join(', ')} given but TLS is off: add --tls require (or optional)`);
    return { mode };
  }
  return { mode, credentials: await loadTlsCredentials(files) };
}

async function accessPolicy(access: unknown): Promise<AccessPolicy | undefined> {
  if (access === undefined) return undefined;
  if (typeof access === 'string') return loadAccessFile(access);
  return parseAccessConfig(access, 'access (from the config file)');
}

export async function serve(options: ServeOptions, logger: Logger): Promise<void> {
  const tcp = parseListen(options.listen);
  const adminAddress = options.adminListen === undefined ? undefined : parseListen(options.adminListen);
  if (adminAddress !== undefined && options.adminToken === undefined) {
    throw new OperationError('EINVAL', 'the admin API listens on TCP only with a token (--admin-token-file or CLONEBD_ADMIN_TOKEN)');
  }
  const metricsAddress: HostPort | undefined = options.metrics === undefined ? undefined : parseListen(options.metrics);
  const tls = await tlsSettings(options);
  const access = await accessPolicy(options.access);
  const settings = {
    tls,
    ...(access === undefined ? {} : { access }),
    ...(options.limits === undefined ? {} : { limits: options.limits }),
  };
  // Refused settings must not leave a new pool behind.
  checkServerSettings(settings);
  const isNewPool = (await readdir(options.pool).catch(() => [])).length === 0;
  await mkdir(options.pool, { recursive: true });
  const ioUring = fileIoOnIoUring();
  const pool = await Pool.open(options.pool, {
    logger: logger.child({ component: 'store' }),
    // The server polls over a lone request with io_uring, so a lone slow read need not hold the loop.
    files: nodeFileLayer(new SyncIoPolicy({ loneReadsWaitOnSpot: !ioUring })),
    ...(options.capacity === undefined ? {} : { capacityBytes: options.capacity }),
  });
  if (options.defaultVolume && isNewPool) {
    await pool.createVolume(DEFAULT_VOLUME_NAME, DEFAULT_VOLUME_SIZE);
    logger.info({ volume: DEFAULT_VOLUME_NAME, size: DEFAULT_VOLUME_SIZE }, 'created the demo volume');
  }
  const registry = metricsAddress === undefined ? undefined : new Registry();
  const server = new NbdServer({ catalog: pool, logger: logger.child({ component: 'nbd' }), metrics: registry, fileIoOnIoUring: ioUring, ...settings });
  const admin = new AdminServer({ store: pool, attachments: server, logger: logger.child({ component: 'admin' }) });
  let address: AddressInfo;
  let adminTcpAddress: AddressInfo | undefined;
  let metricsEndpoint: Awaited<ReturnType<typeof startMetricsEndpoint>> | undefined;
  try {
    address = (await server.listen(tcp)) as AddressInfo;
    if (options.socket !== undefined) await server.listen({ path: options.socket });
    await server.listen({ path: nbdSocketPath(options.pool) }, { trusted: true, mode: 0o600 });
    await admin.listen(adminSocketPath(options.pool));
    const adminTcp =
      adminAddress === undefined ? undefined : await admin.listenTcp(adminAddress.host, adminAddress.port, options.adminToken!);
    if (adminTcp !== undefined) adminTcpAddress = adminTcp;
    if (registry !== undefined && metricsAddress !== undefined) {
      metricsEndpoint = await startMetricsEndpoint(metricsAddress, registry, poolGauges(registry, pool));
    }
  } catch (error) {
    metricsEndpoint?.server.close();
    await admin.close();
    await server.close();
    await pool.close();
    throw error;
  }
  const stopped = stopSignal(logger);
  // The listening line is the daemon's handshake with whoever started it: printed whatever the
  // level, unless logging is off altogether.
  const announcer = logger.level === 'silent' ? logger : logger.child({}, { level: 'info' });
  announcer.info(
    { pool: options.pool, address: address.address, port: address.port, socket: options.socket, tls: tls.mode, admin: adminSocketPath(options.pool), adminTcp: adminTcpAddress, metrics: metricsEndpoint?.address },
    'listening',
  );
  if (!ioUring) {
    logger.info('file I/O runs on the libuv thread pool; UV_USE_IO_URING=1 in the environment (as npm start sets it) makes reads that miss the page cache cheaper');
  }
  await stopped;
  metricsEndpoint?.server.close();
  await admin.close();
  await server.close();
  await pool.close();
  logger.info('stopped');
}
