/**
 * `clonebd attach-file`: serves an NBD export as the regular file MOUNTPOINT/disk through the
 * kernel's FUSE, for `losetup` to make a block device of where the kernel has no nbd module. Runs
 * in the foreground until the mount point is unmounted.
 *
 * Signals: SIGHUP re-reads the export's size and grows the file if the export grew (then
 * `losetup -c` grows a loop device over it); SIGTERM and SIGINT unmount, which a busy mount refuses.
 */
import { stat, rename, rm, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import pino from 'pino';
import type { Argv, CommandModule } from 'yargs';
import { parseNbdUri, type NbdTarget } from '../../native-free/index.js';
import { attachFile } from '../fuse/index.js';
import { OperationError } from '../util/errors.js';

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
/** libuv's pool size when UV_THREADPOOL_SIZE is not set. */
const DEFAULT_THREADPOOL = 4;
/** Pool threads kept free of /dev/fuse reads, for the file system work of everything else. */
const SPARE_THREADS = 2;
const MAX_READERS = 64;

interface AttachFileArgs {
  socket: string | undefined;
  uri: string | undefined;
  export: string | undefined;
  mountpoint: string;
  'pid-file': string | undefined;
  readers: number | undefined;
  'log-level': (typeof LOG_LEVELS)[number];
}

function threadpoolSize(): number {
  const size = Number(process.env.UV_THREADPOOL_SIZE ?? DEFAULT_THREADPOOL);
  return Number.isSafeInteger(size) && size > 0 ? size : DEFAULT_THREADPOOL;
}

/** The export to serve, from --socket and --export or from --uri (whose path names the export). */
export function exportOf(args: Pick<AttachFileArgs, 'socket' | 'uri' | 'export'>): { target: NbdTarget; exportName: string } {
  if ((args.socket === undefined) === (args.uri === undefined)) {
    throw new OperationError('EINVAL', 'give exactly one of --socket PATH and --uri URI');
  }
  if (args.socket !== undefined) {
    if (args.socket === '') throw new OperationError('EINVAL', '--socket must not be empty');
    if (args.export === undefined || args.export === '') throw new OperationError('EINVAL', '--socket needs --export NAME');
    return { target: { path: args.socket }, exportName: args.export };
  }
  let parsed: ReturnType<typeof parseNbdUri>;
  try {
    parsed = parseNbdUri(args.uri!);
  } catch (error) {
    throw new OperationError('EINVAL', (error as Error).message);
  }
  if (args.export !== undefined && parsed.exportName !== '' && args.export !== parsed.exportName) {
    throw new OperationError('EINVAL', `--export ${JSON.stringify(args.export)} differs from the export the URI names (${JSON.stringify(parsed.exportName)})`);
  }
  return { target: parsed.target, exportName: args.export ?? parsed.exportName };
}

/** Readers asked for, or as many as the pool allows; never so many that they hold every pool thread. */
export function readersFor(asked: number | undefined, poolSize: number): number {
  const allowed = poolSize - SPARE_THREADS;
  if (asked === undefined) {
    if (allowed < 1) throw new OperationError('EINVAL', `UV_THREADPOOL_SIZE=${poolSize} leaves no thread to read /dev/fuse: set it to ${SPARE_THREADS + 1} or more`);
    return Math.min(allowed, 8);
  }
  if (!Number.isSafeInteger(asked) || asked < 1 || asked > MAX_READERS) {
    throw new OperationError('EINVAL', `--readers must be a whole number from 1 to ${MAX_READERS}`);
  }
  if (asked > allowed) {
    throw new OperationError('EINVAL', `--readers ${asked} needs UV_THREADPOOL_SIZE=${asked + SPARE_THREADS} or more (it is ${poolSize})`);
  }
  return asked;
}

async function requireDirectory(path: string): Promise<void> {
  const info = await stat(path).catch((error: NodeJS.ErrnoException) => {
    throw new OperationError(error.code === 'ENOENT' ? 'ENOENT' : 'EINVAL', `--mountpoint ${path}: ${error.message}`, { cause: error });
  });
  if (!info.isDirectory()) throw new OperationError('EINVAL', `--mountpoint ${path} is not a directory`);
}

/** Written in one step (temporary file, rename), so a reader never sees half a pid. */
async function writePidFile(path: string): Promise<void> {
  const temporary = `${path}.${process.pid}.tmp`;
  await writeFile(temporary, `${process.pid}\n`);
  await rename(temporary, path);
}

async function run(args: AttachFileArgs): Promise<void> {
  const { target, exportName } = exportOf(args);
  const readers = readersFor(args.readers, threadpoolSize());
  const mountpoint = resolve(args.mountpoint);
  if (process.getuid?.() !== 0) throw new OperationError('EPERM', 'attach-file mounts with mount(8) and must run as root');
  await requireDirectory(mountpoint);
  const log = pino({ level: args['log-level'] }).child({ export: exportName, mountpoint });

  // Before anything can send SIGHUP: its default action would end the process.
  let attached: Awaited<ReturnType<typeof attachFile>> | undefined;
  let growing = Promise.resolve();
  const onHangup = (): void => {
    growing = growing.then(async () => {
      if (attached === undefined) return;
      try {
        const { previous, size } = await attached.grow();
        if (size > previous) log.info({ previous, size }, 'grown');
        else log.info({ size }, 'the export has not grown');
      } catch (error) {
        log.error({ err: error }, 'could not learn the export\'s size');
      }
    });
  };
  let stopAsked = false;
  const stop = (signal: NodeJS.Signals): void => {
    void attached?.stop().then((refused) => {
      if (refused !== undefined) log.warn({ signal, reason: refused }, 'still in use: detach its users (losetup -d, umount) first; serving on');
    });
  };
  const onStop = (signal: NodeJS.Signals): void => {
    stopAsked = true;
    stop(signal);
  };
  process.on('SIGHUP', onHangup);
  process.on('SIGTERM', onStop);
  process.on('SIGINT', onStop);
  try {
    try {
      attached = await attachFile({ target, exportName, mountpoint, readers, log });
    } catch (error) {
      if (error instanceof OperationError) throw error;
      throw new OperationError('EIO', `cannot serve ${exportName} at ${mountpoint}: ${(error as Error).message}`, { cause: error });
    }
    log.info({ file: attached.file, size: attached.size, readers }, 'serving');
    if (stopAsked) stop('SIGTERM');
    if (args['pid-file'] !== undefined) await writePidFile(args['pid-file']);
    await attached.done;
    await growing;
    log.info('unmounted');
  } finally {
    process.off('SIGHUP', onHangup);
    process.off('SIGTERM', onStop);
    process.off('SIGINT', onStop);
    if (args['pid-file'] !== undefined) await rm(args['pid-file'], { force: true });
  }
}

function builder(yargs: Argv): Argv<AttachFileArgs> {
  return yargs
    .option('socket', { type: 'string', describe: 'Unix socket of the NBD server (e.g. POOL/nbd.sock); with --export' })
    .option('uri', { type: 'string', describe: 'nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH' })
    .option('export', { type: 'string', describe: 'Export (volume) name' })
    .option('mountpoint', { type: 'string', demandOption: true, describe: 'Existing empty directory; the export appears as MOUNTPOINT/disk' })
    .option('pid-file', { type: 'string', describe: 'Written with the process id once the file is served, removed at exit' })
    .option('readers', {
      type: 'number',
      describe: 'Concurrent reads of /dev/fuse; each holds a libuv pool thread, so UV_THREADPOOL_SIZE must exceed it by 2',
      defaultDescription: 'UV_THREADPOOL_SIZE - 2, at most 8',
    })
    .option('log-level', {
      choices: LOG_LEVELS,
      default: (process.env.CLONEBD_LOG_LEVEL ?? 'info') as (typeof LOG_LEVELS)[number],
      describe: 'Log level; env CLONEBD_LOG_LEVEL',
    })
    .check((args) => {
      exportOf(args);
      readersFor(args.readers, threadpoolSize());
      return true;
    })
    .example('$0 attach-file --socket /srv/pool/nbd.sock --export vol1 --mountpoint /run/vol1', 'then: losetup --find --show /run/vol1/disk')
    .example('kill -HUP PID; losetup -c /dev/loopN', 'after the volume grew: grow the file, then the loop device') as Argv<AttachFileArgs>;
}

export const attachFileCommand: CommandModule<object, AttachFileArgs> = {
  command: 'attach-file',
  describe: 'Serve an NBD export as a growable regular file through FUSE (root; for losetup where there is no nbd module)',
  builder,
  handler: run,
};
