/**
 * Runs the real `clonebd serve` (the built CLI in dist/) as a child process for integration tests.
 *
 * Readiness is the server's own word: the pino line with `"msg":"listening"` carries the address
 * and the run-time port (we always ask for port 0). Nothing sleeps: start resolves on that line and
 * rejects as soon as the process exits without it. Every server started here is registered so
 * `stopAllServerProcesses` (called from afterEach/afterAll) stops it even when a test failed
 * half-way; a process-exit hook SIGKILLs any that escaped that.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Pool } from '../../src/store/index.js';

/** The built CLI entry point; `npm test` builds before vitest runs. */
export const CLI_PATH = fileURLToPath(new URL('../../dist/src/cli/main.js', import.meta.url));

const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 10_000;

export interface LogLine {
  level?: number;
  msg?: string;
  [key: string]: unknown;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** stop() had to SIGKILL the process after SIGTERM did not end it in time. */
  killed: boolean;
}

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
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const child of liveChildren) child.kill('SIGKILL');
  });
}

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
  if (!existsSync(CLI_PATH)) {
    throw new Error(`${CLI_PATH} is missing: build first (npm run build; npm test builds before running vitest)`);
  }
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
  installExitHook();
  const child = spawn(process.execPath, [CLI_PATH, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: env ?? process.env,
  });
  liveChildren.add(child);
  const logs: LogLine[] = [];
  const stderrChunks: Buffer[] = [];
  const waiters = new Set<(line: LogLine) => void>();
  let pending = '';

  const exited = new Promise<ExitStatus>((resolve) => {
    child.on('exit', (code, signal) => {
      liveChildren.delete(child);
      resolve({ code, signal, killed: false });
    });
    // A process that could not be spawned never exits; count it as exited, with the reason in stderr.
    child.on('error', (error) => {
      stderrChunks.push(Buffer.from(`spawn failed: ${error.message}\n`));
      if (child.pid === undefined) {
        liveChildren.delete(child);
        resolve({ code: null, signal: null, killed: false });
      }
    });
  });

  // stdout must be drained for the whole life of the server, or a full pipe would block its logger.
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    pending += chunk;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const text = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (text.trim() === '') continue;
      let line: LogLine;
      try {
        const parsed: unknown = JSON.parse(text);
        line = typeof parsed === 'object' && parsed !== null ? (parsed as LogLine) : { raw: text };
      } catch {
        line = { raw: text };
      }
      logs.push(line);
      for (const waiter of [...waiters]) waiter(line);
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => stderrChunks.push(chunk));
  const stderr = (): string => Buffer.concat(stderrChunks).toString('utf8');
  const describe = (): string =>
    `server: node ${CLI_PATH} ${args.join(' ')}\n--- stdout\n${logs
      .map((line) => JSON.stringify(line))
      .join('\n')}\n--- stderr\n${stderr()}`;

  const waitForLog = (match: (line: LogLine) => boolean, timeoutMs = START_TIMEOUT_MS): Promise<LogLine> => {
    const found = logs.find(match);
    if (found !== undefined) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const finish = (): void => {
        waiters.delete(onLine);
        clearTimeout(timer);
      };
      const onLine = (line: LogLine): void => {
        if (!match(line)) return;
        finish();
        resolve(line);
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`no matching log line within ${timeoutMs} ms\n${describe()}`));
      }, timeoutMs);
      waiters.add(onLine);
      void exited.then((status) => {
        if (!waiters.has(onLine)) return;
        finish();
        reject(new Error(`server exited (code ${status.code}, signal ${status.signal}) before the awaited log line\n${describe()}`));
      });
    });
  };

  let stopping: Promise<ExitStatus> | undefined;
  const stop = (signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitStatus> => {
    stopping ??= (async () => {
      let status: ExitStatus;
      if (child.exitCode !== null || child.signalCode !== null) {
        status = await exited;
      } else {
        child.kill(signal);
        let timer: NodeJS.Timeout | undefined;
        const deadline = new Promise<'timeout'>((resolve) => {
          timer = setTimeout(() => resolve('timeout'), STOP_TIMEOUT_MS);
        });
        const first = await Promise.race([exited, deadline]);
        clearTimeout(timer);
        if (first === 'timeout') {
          child.kill('SIGKILL');
          status = { ...(await exited), killed: true };
        } else {
          status = first;
        }
      }
      live.delete(server);
      await removeTempDir();
      return status;
    })();
    return stopping;
  };

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
    pid: child.pid ?? -1,
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
