/**
 * Runs the real `clonebd csi` (the built CLI in dist/) as a child process on a socket in a fresh
 * temp dir, against the daemon of a pool. Readiness is the driver's `"msg":"listening"` log line;
 * start rejects as soon as the process exits without it. Every driver started here is stopped by
 * `stopAllCsiProcesses` (for afterEach/afterAll) and SIGKILLed on process exit if one escaped.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CsiClient } from './csi-client.js';
import { CLI_PATH, type ExitStatus, type LogLine } from './server-process.js';

const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 10_000;

export interface CsiStartOptions {
  /** The daemon's pool (`--pool`); leave out when `args` carry `--admin`. */
  pool?: string;
  nodeId?: string;
  /** `unix:///...` to serve on; default: a socket in the helper's temp dir. */
  endpoint?: string;
  /** Extra `clonebd csi` arguments. */
  args?: string[];
  env?: NodeJS.ProcessEnv;
}

export interface CsiProcess {
  readonly pid: number;
  /** `unix:///...` of the driver's socket. */
  readonly endpoint: string;
  /** A client on the driver's socket, closed by stop(). */
  readonly client: CsiClient;
  readonly logs: readonly LogLine[];
  stderr(): string;
  readonly exited: Promise<ExitStatus>;
  /** SIGTERM (or `signal`), wait for exit, SIGKILL after a bounded wait; removes the temp dir. */
  stop(signal?: NodeJS.Signals): Promise<ExitStatus>;
}

const live = new Set<CsiProcess>();
const children = new Set<ChildProcess>();
let exitHookInstalled = false;

export async function stopAllCsiProcesses(): Promise<void> {
  await Promise.all([...live].map((driver) => driver.stop()));
}

export async function startCsiProcess(options: CsiStartOptions = {}): Promise<CsiProcess> {
  if (!existsSync(CLI_PATH)) throw new Error(`${CLI_PATH} is missing: build first (npm run build)`);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const child of children) child.kill('SIGKILL');
    });
  }
  const tempDir = await mkdtemp(join(tmpdir(), 'clonebd-csi-'));
  const endpoint = options.endpoint ?? `unix://${join(tempDir, 'csi.sock')}`;
  const args = [
    CLI_PATH,
    'csi',
    '--endpoint',
    endpoint,
    '--node-id',
    options.nodeId ?? 'node-a',
    '--state-dir',
    join(tempDir, 'state'),
    ...(options.pool === undefined ? [] : ['--pool', options.pool]),
    ...(options.args ?? []),
  ];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  children.add(child);
  const logs: LogLine[] = [];
  const stderrChunks: Buffer[] = [];
  const waiters = new Set<(line: LogLine) => void>();
  const exited = new Promise<ExitStatus>((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal, killed: false });
    });
    child.on('error', (error) => {
      stderrChunks.push(Buffer.from(`spawn failed: ${error.message}\n`));
      if (child.pid === undefined) {
        children.delete(child);
        resolve({ code: null, signal: null, killed: false });
      }
    });
  });
  let pending = '';
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
    `driver: node ${args.join(' ')}\n--- stdout\n${logs.map((line) => JSON.stringify(line)).join('\n')}\n--- stderr\n${stderr()}`;

  const client = new CsiClient(endpoint);
  let stopping: Promise<ExitStatus> | undefined;
  const driver: CsiProcess = {
    pid: child.pid ?? -1,
    endpoint,
    client,
    logs,
    stderr,
    exited,
    stop(signal: NodeJS.Signals = 'SIGTERM') {
      stopping ??= (async () => {
        client.close();
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
        live.delete(driver);
        await rm(tempDir, { recursive: true, force: true });
        return status;
      })();
      return stopping;
    },
  };
  live.add(driver);

  try {
    await new Promise<void>((resolve, reject) => {
      const isListening = (line: LogLine): boolean => line.msg === 'listening';
      if (logs.some(isListening)) {
        resolve();
        return;
      }
      const finish = (): void => {
        waiters.delete(onLine);
        clearTimeout(timer);
      };
      const onLine = (line: LogLine): void => {
        if (!isListening(line)) return;
        finish();
        resolve();
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`the driver did not listen within ${START_TIMEOUT_MS} ms\n${describe()}`));
      }, START_TIMEOUT_MS);
      waiters.add(onLine);
      void exited.then((status) => {
        if (!waiters.has(onLine)) return;
        finish();
        reject(new Error(`the driver exited (code ${status.code}, signal ${status.signal}) before listening\n${describe()}`));
      });
    });
  } catch (error) {
    await driver.stop();
    throw error;
  }
  return driver;
}
