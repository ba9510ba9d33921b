/**
 * Runs the real `clonebd serve` (the built CLI in dist/) as a child process for integration tests.
 *
 * Readiness is the server's own word: the pino line with `"msg":"listening"` carries the address
 * and the run-time port (we always ask for port 0). Nothing sleeps: start resolves on that line and
 * rejects as soon as the process exits without it. Every server started here is registered so
 * `stopAllServerProcesses` (called from afterEach/afterAll) stops it even when a test failed
 * half-way; a process-exit hook SIGKILLs any that escaped that.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serverEnvironment } from '../../src/cli/server-env.js';
import type { Pool } from '../../src/store/index.js';
import { spawnCli, type ExitStatus, type LogLine } from './cli-process.js';

export { CLI_PATH, type ExitStatus, type LogLine } from './cli-process.js';

const START_TIMEOUT_MS = 20_000;

export interface StartOptions {
  /** Pool directory to serve. Default: `pool` inside a fresh temp dir (absent until serve makes it). */
  pool?: string;
  /** Extra `serve` arguments. `--listen 127.0.0.1:0` is added unless these contain `--listen`. */
  args?: string[];
  /** Also listen on a Unix socket in the helper's temp dir. */
  socket?: boolean;
  /** Runs against the pool (opened with the store's Pool) before the server starts on it. */
  prepare?: (pool: Pool) => Promise<unknown>;
  env?: NodeJS.ProcessEnv;
}

export interface ServerProcess {
  readonly pid: number;
  readonly pool: string;
  /** TCP address from the listening line; throws if the server listens on no TCP port. */
  readonly host: string;
  readonly port: number;
  /** Unix socket path from the listening line, if any. */
  readonly socket: string | undefined;
  /** Every stdout line so far, parsed as JSON (non-JSON lines as `{ raw }`). */
  readonly logs: readonly LogLine[];
  stderr(): string;
  /** `nbd://HOST:PORT/NAME`, or `nbd+unix:///NAME?socket=PATH` when there is no TCP listener. */
  uri(name: string): string;
  unixUri(name: string): string;
  /** Resolves on the first log line (past or future) that matches. */
  waitForLog(match: (line: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  readonly exited: Promise<ExitStatus>;
  /** SIGTERM (or `signal`), wait for exit, SIGKILL after a bounded wait; removes the helper's temp dir. */
  stop(signal?: NodeJS.Signals): Promise<ExitStatus>;
}

const live = new Set<ServerProcess>();

/** Stops every server this module started and has not stopped yet. */
export async function stopAllServerProcesses(): Promise<void> {
  await Promise.all([...live].map((server) => server.stop()));
}

function formatHost(address: string): string {
  return address.includes(':') ? `[${address}]` : address;
}

async function preparePool(dir: string, prepare: (pool: Pool) => Promise<unknown>): Promise<void> {
  const { Pool: PoolClass } = await import('../../src/store/index.js');
  const pool = await PoolClass.open(dir);
  try {
    await prepare(pool);
  } finally {
    await pool.close();
  }
}

export async function startServerProcess(options: StartOptions = {}): Promise<ServerProcess> {
  const tempDir = await mkdtemp(join(tmpdir(), 'clonebd-server-'));
  const removeTempDir = (): Promise<void> => rm(tempDir, { recursive: true, force: true });
  try {
    const pool = options.pool ?? join(tempDir, 'pool');
    if (options.prepare !== undefined) await preparePool(pool, options.prepare);
    const args = ['serve', '--pool', pool, ...(options.args ?? [])];
    if (!args.includes('--listen')) args.push('--listen', '127.0.0.1:0');
    if (options.socket === true) args.push('--socket', join(tempDir, 'nbd.sock'));
    return await spawnServer(args, pool, removeTempDir, options.env);
  } catch (error) {
    await removeTempDir();
    throw error;
  }
}

function spawnServer(
  args: string[],
  pool: string,
  removeTempDir: () => Promise<void>,
  env: NodeJS.ProcessEnv | undefined,
): Promise<ServerProcess> {
  const cli = spawnCli(args, {
    label: 'server',
    env: serverEnvironment(env),
    cleanup: async () => {
      live.delete(server);
      await removeTempDir();
    },
  });
  const { logs, stderr, describe, exited, stop } = cli;
  const waitForLog = (match: (line: LogLine) => boolean, timeoutMs = START_TIMEOUT_MS): Promise<LogLine> => cli.waitForLog(match, timeoutMs);

  let listening: LogLine = {};
  const tcp = (): { host: string; port: number } => {
    const { address, port } = listening;
    if (typeof port !== 'number') throw new Error(`the server listens on no TCP port\n${describe()}`);
    return { host: typeof address === 'string' ? address : '127.0.0.1', port };
  };
  const socket = (): string | undefined => (typeof listening.socket === 'string' ? listening.socket : undefined);
  const unixUri = (name: string): string => {
    const path = socket();
    if (path === undefined) throw new Error(`the server listens on no Unix socket\n${describe()}`);
    return `nbd+unix:///${encodeURIComponent(name)}?socket=${encodeURIComponent(path)}`;
  };

  const server: ServerProcess = {
    pid: cli.pid,
    pool,
    get host() {
      return tcp().host;
    },
    get port() {
      return tcp().port;
    },
    get socket() {
      return socket();
    },
    logs,
    stderr,
    uri(name) {
      if (typeof listening.port !== 'number') return unixUri(name);
      const { host, port } = tcp();
      return `nbd://${formatHost(host)}:${port}/${encodeURIComponent(name)}`;
    },
    unixUri,
    waitForLog,
    exited,
    stop,
  };
  live.add(server);

  return waitForLog((line) => line.msg === 'listening').then(
    (line) => {
      listening = line;
      return server;
    },
    async (error: unknown) => {
      await stop('SIGKILL');
      throw error;
    },
  );
}
