/**
 * A `clonebd serve` child for the harness scripts: started on a pool, ready once it prints its
 * listening line (which names the TCP port it chose), and ended by SIGKILL or SIGTERM.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { serverEnvironment } from '../src/cli/server-env.js';
import { AdminClient } from '../src/control/admin-client.js';

const READY_TIMEOUT_MS = 30_000;
const STDERR_KEEP = 4096;

/** The built CLI beside these scripts once compiled: dist/scripts → dist/src. */
export const BUILT_CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

export interface ClonebdProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly port: number;
  /** The pool's NBD Unix socket. */
  readonly socket: string;
  readonly admin: AdminClient;
  /** The end of what it wrote to stderr, for error messages. */
  stderrTail(): string;
  kill(): Promise<void>;
  /** SIGTERM, and wait for the exit. */
  stop(): Promise<void>;
}

function exitOf(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

export async function startClonebd(cli: string, pool: string, extraArgs: readonly string[] = []): Promise<ClonebdProcess> {
  const args = [cli, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', '--no-default-volume', '--log-level', 'warn', ...extraArgs];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: serverEnvironment() });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-STDERR_KEEP)));
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`clonebd not listening after ${READY_TIMEOUT_MS} ms\n${stderr}`)), READY_TIMEOUT_MS);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (!line.includes('"msg":"listening"')) return;
      clearTimeout(timer);
      resolve((JSON.parse(line) as { port: number }).port);
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`clonebd exited (${code ?? signal}) before listening; the pool must open without repair\n${stderr}`));
    });
  });
  return {
    child,
    pid: child.pid!,
    port,
    socket: join(pool, 'nbd.sock'),
    admin: new AdminClient(join(pool, 'admin.sock')),
    stderrTail: () => stderr,
    kill() {
      const exited = exitOf(child);
      child.kill('SIGKILL');
      return exited;
    },
    stop() {
      const exited = exitOf(child);
      child.kill('SIGTERM');
      return exited;
    },
  };
}
