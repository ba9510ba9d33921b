/**
 * A child running the built CLI (dist/), as the test helpers for `clonebd serve` and `clonebd csi`
 * start it: its pino lines parsed as they come (stdout is drained for the whole life of the
 * process, or a full pipe would block its logger), waits on a log line that reject as soon as the
 * process exits, and a stop that sends a signal and SIGKILLs after a bounded wait. A process-exit
 * hook SIGKILLs any child a test left behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The built CLI entry point; `npm test` builds before vitest runs. */
export const CLI_PATH = fileURLToPath(new URL('../../dist/src/cli/main.js', import.meta.url));

const STOP_TIMEOUT_MS = 10_000;

export interface LogLine {
  level?: number;
  msg?: string;
  [key: string]: unknown;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** stop() had to SIGKILL the process after its signal did not end it in time. */
  killed: boolean;
}

export interface CliProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Every stdout line so far, parsed as JSON (non-JSON lines as `{ raw }`). */
  readonly logs: readonly LogLine[];
  stderr(): string;
  /** The command line, stdout and stderr, for error messages. */
  describe(): string;
  readonly exited: Promise<ExitStatus>;
  /** Resolves on the first log line (past or future) that matches. */
  waitForLog(match: (line: LogLine) => boolean, timeoutMs: number): Promise<LogLine>;
  /** Sends `signal`, waits for the exit, SIGKILLs after a bounded wait, then runs `cleanup` once. */
  stop(signal?: NodeJS.Signals): Promise<ExitStatus>;
}

const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

export function spawnCli(
  args: readonly string[],
  options: { label: string; env?: NodeJS.ProcessEnv; cleanup: () => Promise<void> },
): CliProcess {
  if (!existsSync(CLI_PATH)) {
    throw new Error(`${CLI_PATH} is missing: build first (npm run build; npm test builds before running vitest)`);
  }
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const child of liveChildren) child.kill('SIGKILL');
    });
  }
  const child = spawn(process.execPath, [CLI_PATH, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  liveChildren.add(child);
  const logs: LogLine[] = [];
  const stderrChunks: Buffer[] = [];
  const waiters = new Set<(line: LogLine) => void>();

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
    `${options.label}: node ${CLI_PATH} ${args.join(' ')}\n--- stdout\n${logs
      .map((line) => JSON.stringify(line))
      .join('\n')}\n--- stderr\n${stderr()}`;

  const waitForLog = (match: (line: LogLine) => boolean, timeoutMs: number): Promise<LogLine> => {
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
        reject(new Error(`${options.label} exited (code ${status.code}, signal ${status.signal}) before the awaited log line\n${describe()}`));
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
      await options.cleanup();
      return status;
    })();
    return stopping;
  };

  return { child, pid: child.pid ?? -1, logs, stderr, describe, exited, waitForLog, stop };
}
