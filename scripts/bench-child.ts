/**
 * Child processes of the benchmark: servers that live for the whole run and tools (fio, sync) that
 * run to completion.
 *
 * Every child is registered until it exits. `stopAllChildren` ends them (SIGTERM, then SIGKILL after
 * a bounded wait) and refuses new ones from then on, so a Ctrl-C that lands while a server is
 * starting cannot leave that server behind; a process-exit hook SIGKILLs anything still registered
 * when the harness itself dies of an error. Servers are spawned directly, never through a shell, so
 * the PID the harness measures is the server's own.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';

const STOP_GRACE_MS = 5_000;
const READY_TIMEOUT_MS = 30_000;
const PROBE_INTERVAL_MS = 50;
/** Keep the tail of a child's stderr for error messages, not all of it. */
const STDERR_KEEP = 8 * 1024;

const live = new Set<ChildProcess>();
let closed = false;

process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

function register(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
  child.once('error', () => {
    if (child.pid === undefined) live.delete(child);
  });
}

function spawnTracked(file: string, args: readonly string[], env?: NodeJS.ProcessEnv, withInput = false): ChildProcess {
  if (closed) throw new Error(`not starting ${file}: the harness is shutting down`);
  const child = spawn(file, args, { stdio: [withInput ? 'pipe' : 'ignore', 'pipe', 'pipe'], env: env ?? process.env });
  register(child);
  return child;
}

function exitOf(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => {
      if (child.pid === undefined) resolve();
    });
  });
}

async function stopChild(child: ChildProcess): Promise<void> {
  const exited = exitOf(child);
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return exited;
  child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((resolve) => {
    timer = setTimeout(() => resolve('late'), STOP_GRACE_MS);
  });
  if ((await Promise.race([exited, late])) === 'late') child.kill('SIGKILL');
  clearTimeout(timer);
  await exited;
}

/** Stops every child and refuses to start more. */
export async function stopAllChildren(): Promise<void> {
  closed = true;
  await Promise.all([...live].map((child) => stopChild(child)));
}

function describeCommand(file: string, args: readonly string[]): string {
  return [file, ...args].map((word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word}'`)).join(' ');
}

function collectTail(child: ChildProcess): () => string {
  let tail = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (chunk: string) => {
    tail = (tail + chunk).slice(-STDERR_KEEP);
  });
  return () => tail;
}

export interface RunOutput {
  stdout: string;
  stderr: string;
}

/** Runs a tool to completion, `input` on its stdin if given; rejects with its stderr unless it exits 0. */
export function runTool(file: string, args: readonly string[], timeoutMs: number, input?: string): Promise<RunOutput> {
  const command = describeCommand(file, args);
  return new Promise((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawnTracked(file, args, undefined, input !== undefined);
    } catch (error) {
      reject(error);
      return;
    }
    if (input !== undefined) {
      // A tool that exits before reading all of it closes the pipe; its exit status tells.
      child.stdin?.on('error', () => undefined);
      child.stdin?.end(input);
    }
    const stdout: Buffer[] = [];
    const stderr = collectTail(child);
    child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${command}: ${error.message}`, { cause: error }));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const out = { stdout: Buffer.concat(stdout).toString('utf8'), stderr: stderr() };
      if (code === 0) resolve(out);
      else reject(new Error(`${command} ended with ${code === null ? `signal ${signal}` : `exit ${code}`}\n${out.stderr}`));
    });
  });
}

/** A TCP port that was free a moment ago on `host` (bound with port 0, then released). */
export function findFreePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, host, () => {
      const address = server.address();
      server.close(() => {
        if (typeof address === 'object' && address !== null) resolve(address.port);
        else reject(new Error('no port from the kernel'));
      });
    });
  });
}

/** True when an NBD server answers on host:port: the newstyle greeting starts with "NBDMAGIC". */
function probeNbd(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    let received = Buffer.alloc(0);
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(2_000, () => done(false));
    socket.once('error', () => done(false));
    socket.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length >= 8) done(received.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    socket.once('end', () => done(false));
  });
}

export interface ServerChild {
  readonly pid: number;
  readonly command: string;
  /** The process has exited (crashed, or was stopped). */
  readonly exited: boolean;
  stderrTail(): string;
  stop(): Promise<void>;
}

/**
 * Starts a server and resolves once it greets an NBD client on host:port; rejects (and stops the
 * process) if it exits first or stays silent past the deadline.
 */
export async function startServer(
  file: string,
  args: readonly string[],
  host: string,
  port: number,
  env?: NodeJS.ProcessEnv,
): Promise<ServerChild> {
  const command = describeCommand(file, args);
  const child = spawnTracked(file, args, env);
  const stderrTail = collectTail(child);
  // A server's stdout must keep draining or a full pipe would stall its logger.
  child.stdout?.resume();
  let exited = false;
  let spawnError: Error | undefined;
  child.once('exit', () => {
    exited = true;
  });
  child.once('error', (error) => {
    spawnError = error;
    if (child.pid === undefined) exited = true;
  });
  const server: ServerChild = {
    get pid() {
      return child.pid ?? -1;
    },
    command,
    get exited() {
      return exited;
    },
    stderrTail,
    stop: () => stopChild(child),
  };
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (exited) {
      const reason = spawnError?.message ?? `exit ${child.exitCode ?? `signal ${child.signalCode}`}`;
      throw new Error(`${command} did not start (${reason})\n${stderrTail()}`);
    }
    if (await probeNbd(host, port)) return server;
    if (Date.now() > deadline) {
      await server.stop();
      throw new Error(`${command} did not answer on ${host}:${port} within ${READY_TIMEOUT_MS} ms\n${stderrTail()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, PROBE_INTERVAL_MS));
  }
}
