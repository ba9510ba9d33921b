/**
 * Runs the real `clonebd csi` (the built CLI in dist/) as a child process on a socket in a fresh
 * temp dir, against the daemon of a pool. Readiness is the driver's `"msg":"listening"` log line;
 * start rejects as soon as the process exits without it. Every driver started here is stopped by
 * `stopAllCsiProcesses` (for afterEach/afterAll) and SIGKILLed on process exit if one escaped.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnCli, type ExitStatus, type LogLine } from './cli-process.js';
import { CsiClient } from './csi-client.js';

const START_TIMEOUT_MS = 20_000;

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

export async function stopAllCsiProcesses(): Promise<void> {
  await Promise.all([...live].map((driver) => driver.stop()));
}

export async function startCsiProcess(options: CsiStartOptions = {}): Promise<CsiProcess> {
  const tempDir = await mkdtemp(join(tmpdir(), 'clonebd-csi-'));
  const endpoint = options.endpoint ?? `unix://${join(tempDir, 'csi.sock')}`;
  const args = [
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
  const client = new CsiClient(endpoint);
  let cli;
  try {
    cli = spawnCli(args, {
      label: 'driver',
      env: options.env,
      cleanup: async () => {
        client.close();
        live.delete(driver);
        await rm(tempDir, { recursive: true, force: true });
      },
    });
  } catch (error) {
    client.close();
    await rm(tempDir, { recursive: true, force: true });
    throw error;
  }
  const driver: CsiProcess = {
    pid: cli.pid,
    endpoint,
    client,
    logs: cli.logs,
    stderr: cli.stderr,
    exited: cli.exited,
    stop: cli.stop,
  };
  live.add(driver);
  try {
    await cli.waitForLog((line) => line.msg === 'listening', START_TIMEOUT_MS);
  } catch (error) {
    await driver.stop();
    throw error;
  }
  return driver;
}
