/**
 * An NBD export as MOUNTPOINT/disk: the backing connection, the mount and the request loops put
 * together, with the two things a caller does to a running attachment: grow it and stop it.
 *
 * Lifecycle: connect (a bad export fails here, before anything is mounted) → mount → INIT → serve
 * until unmounted → flush and disconnect. `stop` unmounts, which a busy mount (a loop device over
 * the file, an open file) refuses: the attachment then goes on serving, since ending it would fail
 * every later access to data a filesystem above may not have written yet.
 */
import { FuseChannel, type ChannelLog } from './channel.js';
import { FILE_INO, FILE_NAME, FileServer } from './file-server.js';
import { NbdBackingFile } from './nbd-file.js';
import type { NbdTarget } from '../../native-free/index.js';

export interface AttachLog extends ChannelLog {
  info(fields: object, message: string): void;
}

export interface AttachOptions {
  target: NbdTarget;
  exportName: string;
  mountpoint: string;
  /** Concurrent reads of /dev/fuse (each holds a libuv pool thread while it waits). */
  readers: number;
  log: AttachLog;
}

export interface Attached {
  /** MOUNTPOINT/disk. */
  readonly file: string;
  readonly size: number;
  /** Re-reads the export's size; if it grew, the file grows and the kernel is told. */
  grow(): Promise<{ previous: number; size: number }>;
  /** Unmounts; resolves with why it could not (a busy mount keeps serving), or undefined. */
  stop(): Promise<string | undefined>;
  /** Settles once serving has ended and the export is flushed and disconnected. */
  readonly done: Promise<void>;
}

export async function attachFile(options: AttachOptions): Promise<Attached> {
  const { log } = options;
  const backing = await NbdBackingFile.open(options.target, options.exportName);
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  let channel: FuseChannel;
  try {
    channel = await FuseChannel.mount({ mountpoint: options.mountpoint, source: `clonebd:${options.exportName}`, uid, gid });
  } catch (error) {
    await backing.close().catch(() => undefined);
    throw error;
  }
  const server = new FileServer(backing, {
    uid,
    gid,
    onError: (op, error) => log.warn({ op, err: error }, 'a request to the export failed'),
  });
  const done = (async () => {
    try {
      await channel.serve(server, options.readers, log);
    } finally {
      channel.close();
      await backing.close().catch((error: unknown) => log.error({ err: error }, 'the last flush of the export failed'));
    }
  })();
  return {
    file: `${options.mountpoint}/${FILE_NAME}`,
    get size() {
      return backing.size;
    },
    async grow() {
      const result = await backing.refresh();
      if (result.size > result.previous) channel.invalidateAttributes(FILE_INO, log);
      return result;
    },
    stop: () => channel.unmount(),
    done,
  };
}
