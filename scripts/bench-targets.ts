/**
 * Targets: ways to start a server over a prepared export. Each target gets a directory of its own
 * (all on one filesystem), makes a 4 GiB export there, starts its server on 127.0.0.1 at a port
 * chosen at run time, and writes every byte of the export through the server so reads never hit
 * holes. Copy-on-write targets (a clone, a depth-32 clone chain, a qcow2 overlay chain) fit the
 * same shape: their setup builds the chain before starting the server.
 *
 * qemu-nbd runs with `-t` (persistent): without it, it exits when the first client disconnects,
 * and fio connects once per job.
 */
import { open, readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Pool } from '../src/store/index.js';
import { findFreePort, runTool, startServer, type ServerChild } from './bench-child.js';
import { parseFioReport, prefillJobArgs } from './bench-fio.js';

export const EXPORT_NAME = 'bench';
const PREFILL_TIMEOUT_MS = 30 * 60_000;

export interface TargetContext {
  /** This target's own directory. */
  dir: string;
  exportSize: number;
  host: string;
  log(message: string): void;
}

export interface RunningTarget {
  /** The name in tables; differs from the target's when the server had to fall back. */
  readonly name: string;
  /** How the server was started. */
  readonly command: string;
  readonly uri: string;
  readonly server: ServerChild;
  /** Facts a reader of the results must know (fallbacks, checks that failed). */
  readonly notes: readonly string[];
  /** Every file that holds the export's data or metadata, for cache control. */
  backingFiles(): Promise<string[]>;
}

export interface Target {
  readonly name: string;
  readonly description: string;
  /** The target this one repeats as a fairness control; their ratio must be 1.0 ± 0.1. */
  readonly controlOf?: string;
  setup(context: TargetContext): Promise<RunningTarget>;
}

function nbdUri(host: string, port: number): string {
  return `nbd://${host}:${port}/${EXPORT_NAME}`;
}

async function createSparseFile(path: string, size: number): Promise<void> {
  const handle = await open(path, 'wx');
  try {
    await handle.truncate(size);
  } finally {
    await handle.close();
  }
}

async function regularFilesUnder(dir: string): Promise<string[]> {
  const files: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await regularFilesUnder(path)));
    else if (entry.isFile()) files.push(path);
  }
  return files.sort();
}

/** Writes the whole export once through its server; throws unless fio wrote every byte. */
async function prefill(context: TargetContext, uri: string): Promise<void> {
  const output = join(context.dir, 'prefill.json');
  await runTool('fio', prefillJobArgs(uri, output), PREFILL_TIMEOUT_MS);
  const result = parseFioReport(await readFile(output, 'utf8'));
  if (result.ioBytes !== context.exportSize) {
    throw new Error(`prefill of ${uri} wrote ${result.ioBytes} bytes, expected ${context.exportSize}`);
  }
}

/** Starts a server over the file-backed export, then prefills it; stops the server on failure. */
async function startAndPrefill(
  context: TargetContext,
  name: string,
  start: (port: number) => Promise<ServerChild>,
  backingFiles: () => Promise<string[]>,
  notes: string[] = [],
): Promise<RunningTarget> {
  const port = await findFreePort(context.host);
  const server = await start(port);
  const uri = nbdUri(context.host, port);
  try {
    context.log(`${name}: prefilling ${uri}`);
    await prefill(context, uri);
  } catch (error) {
    await server.stop();
    throw error;
  }
  return { name, command: server.command, uri, server, notes, backingFiles };
}

async function fileTarget(
  context: TargetContext,
  name: string,
  command: (file: string, port: number) => { file: string; args: string[] },
): Promise<RunningTarget> {
  const file = join(context.dir, 'disk.raw');
  await createSparseFile(file, context.exportSize);
  return startAndPrefill(
    context,
    name,
    (port) => {
      const { file: program, args } = command(file, port);
      return startServer(program, args, context.host, port);
    },
    async () => [file],
  );
}

/** The built CLI: dist/scripts → dist/src. */
const CLI_PATH = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

const clonebd: Target = {
  name: 'clonebd',
  description: 'clonebd serve, one plain volume in a fresh pool',
  async setup(context) {
    const pool = join(context.dir, 'pool');
    const store = await Pool.open(pool);
    try {
      await store.createVolume(EXPORT_NAME, context.exportSize);
    } finally {
      await store.close();
    }
    return startAndPrefill(
      context,
      'clonebd',
      (port) =>
        startServer(
          process.execPath,
          [CLI_PATH, 'serve', '--pool', pool, '--listen', `${context.host}:${port}`, '--no-default-volume', '--log-level', 'warn'],
          context.host,
          port,
        ),
      () => regularFilesUnder(pool),
    );
  },
};

function nbdkitTarget(name: string, controlOf?: string): Target {
  return {
    name,
    description: 'nbdkit file plugin over a raw file',
    ...(controlOf === undefined ? {} : { controlOf }),
    setup: (context) =>
      fileTarget(context, name, (file, port) => ({
        file: 'nbdkit',
        args: ['--foreground', '--exit-with-parent', '-p', String(port), '-i', context.host, 'file', file],
      })),
  };
}

function qemuNbdArgs(context: TargetContext, file: string, port: number, cacheAndAio: readonly string[]): string[] {
  return ['-f', 'raw', ...cacheAndAio, '-t', '-b', context.host, '-p', String(port), '-x', EXPORT_NAME, file];
}

async function hasIoUring(pid: number): Promise<boolean> {
  const dir = `/proc/${pid}/fd`;
  for (const fd of await readdir(dir)) {
    try {
      if ((await readlink(join(dir, fd))) === 'anon_inode:[io_uring]') return true;
    } catch {
      // the descriptor closed while we looked
    }
  }
  return false;
}

/**
 * qemu-nbd with io_uring; where the kernel refuses io_uring it runs with the thread pool instead and
 * says so in its name, so no table claims io_uring figures it did not measure.
 */
const qemuNbdIoUring: Target = {
  name: 'qemu-nbd-io_uring',
  description: 'qemu-nbd raw file, --cache=writeback --aio=io_uring',
  async setup(context) {
    const file = join(context.dir, 'disk.raw');
    await createSparseFile(file, context.exportSize);
    const start = (aio: string) => (port: number) =>
      startServer('qemu-nbd', qemuNbdArgs(context, file, port, ['--cache=writeback', `--aio=${aio}`]), context.host, port);
    let running: RunningTarget;
    try {
      running = await startAndPrefill(context, 'qemu-nbd-io_uring', start('io_uring'), async () => [file]);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      if (!/io_uring/i.test(message) || /prefill/.test(message)) throw error;
      context.log(`qemu-nbd-io_uring: io_uring refused, falling back to --aio=threads\n${message}`);
      return startAndPrefill(context, 'qemu-nbd-threads', start('threads'), async () => [file], [
        'io_uring was refused here; this column is qemu-nbd --cache=writeback --aio=threads',
      ]);
    }
    if (await hasIoUring(running.server.pid)) return running;
    return { ...running, notes: [...running.notes, 'no io_uring instance found in /proc/PID/fd after prefill'] };
  },
};

const qemuNbdNative: Target = {
  name: 'qemu-nbd-native',
  description: 'qemu-nbd raw file, --cache=none --aio=native (O_DIRECT, Linux AIO)',
  setup: (context) =>
    fileTarget(context, 'qemu-nbd-native', (file, port) => ({
      file: 'qemu-nbd',
      args: qemuNbdArgs(context, file, port, ['--cache=none', '--aio=native']),
    })),
};

/** Every target, in the default order of the first round. */
export const TARGETS: readonly Target[] = [
  clonebd,
  nbdkitTarget('nbdkit'),
  nbdkitTarget('nbdkit-2', 'nbdkit'),
  qemuNbdIoUring,
  qemuNbdNative,
];

/** The target the ratios are about. */
export const SUBJECT = 'clonebd';
