/**
 * Every file the store touches goes through a FileLayer passed in, so tests can substitute a
 * file system that loses or tears unsynced writes on a simulated crash. Errors are thrown as
 * Node's are: an Error with an errno-style `code` ('ENOENT', 'EEXIST', 'ENOSPC', ...).
 *
 * Hole punching: Node has no fallocate(2) and the project allows no native addons, so the default
 * layer runs util-linux `fallocate --punch-hole` as a child process. That costs a process spawn
 * (about 1-5 ms) per range; the store coalesces ranges and punches off the request path. Where
 * the tool is missing, punchHole reports false and the space stays allocated (the store's maps
 * still say the range reads as zeros).
 *
 * Reads and writes up to 1 MiB run synchronously while they are fast: a pread or pwrite that the
 * page cache serves costs a few microseconds on the event loop (a 1 MiB one about 100), against
 * about nine of CPU and a thread hand-off each way through libuv's pool (io_uring, where the
 * server runs with it, saves the hand-offs but not the completion's trip through the event
 * loop), and parallel copies of one file's pages on the pool's threads contend with each other
 * (measured here: one reader 2.1 GB/s, eight 0.5 GB/s in all). When slow ones become frequent
 * (the disk is involved, or the kernel throttles dirty pages) this layer switches to
 * asynchronous transfers for a while, so cold I/O keeps its concurrency and never holds the
 * event loop for long. A lone slow one is only the process being descheduled on a busy machine,
 * and does not count for much.
 */
import { execFile } from 'node:child_process';
import { read, readSync, write, writeSync } from 'node:fs';
import { constants, open, mkdir, readdir, rename, statfs, unlink, type FileHandle as NodeFileHandle } from 'node:fs/promises';
import { allocateShifted } from '../util/buffer-pool.js';

const PROBE_BLOCK = 4096;
/** Largest transfer tried synchronously. */
const SYNC_IO_MAX_BYTES = 1024 * 1024;
/**
 * A synchronous transfer slower than the base plus its length at this rate says the page cache
 * did not serve it: a disk read takes tens of microseconds at least, page-cache copies run at
 * 10 GB/s and more.
 */
const SYNC_IO_SLOW_BASE_MS = 0.05;
const SYNC_IO_CACHE_BYTES_PER_MS = 2_000_000;
/** How long to stay on the thread pool once slow transfers are frequent. */
const SYNC_IO_BACKOFF_MS = 100;
/** The share of recent transfers that were slow, as a moving average, that means "frequent". */
const SYNC_IO_SLOW_SHARE = 0.25;
const SYNC_IO_AVERAGE_WEIGHT = 0.1;

/** Decides, per file layer, whether small transfers may run on the event loop now. */
export class SyncIoPolicy {
  /**
   * A transfer of a caller with nothing else under way runs synchronously even while slow ones are
   * frequent, since nothing of its own waits behind it and the thread pool would only add two
   * thread wake-ups to its wait. Reads may be told otherwise (`loneReadsWaitOnSpot: false`) where
   * file I/O goes through io_uring and the server polls while it serves a lone request (see
   * busy-poll.ts): the ring completes a buffered read that misses the page cache without any
   * thread, and the polling loop sees it at once. Not writes: the kernel hands an ext4 buffered
   * write that would block to a worker thread of its own, which the polling loop would starve
   * (warm 4 KiB writes at QD1 fell from 7.3k to 4.5k IOPS that way).
   */
  readonly loneReadsWaitOnSpot: boolean;
  #asyncUntil = 0;
  #slowShare = 0;

  constructor(options: { loneReadsWaitOnSpot?: boolean } = {}) {
    this.loneReadsWaitOnSpot = options.loneReadsWaitOnSpot ?? true;
  }

  /**
   * Runs `transfer` synchronously if allowed and returns its result, else undefined. `alone`: the
   * caller has no other I/O under way (see above).
   */
  attempt(length: number, transfer: () => number, alone = false): number | undefined {
    if (length > SYNC_IO_MAX_BYTES) return undefined;
    const started = performance.now();
    if (started < this.#asyncUntil && !alone) return undefined;
    const result = transfer();
    const finished = performance.now();
    const slow = finished - started > SYNC_IO_SLOW_BASE_MS + length / SYNC_IO_CACHE_BYTES_PER_MS ? 1 : 0;
    this.#slowShare += (slow - this.#slowShare) * SYNC_IO_AVERAGE_WEIGHT;
    if (this.#slowShare > SYNC_IO_SLOW_SHARE) {
      this.#asyncUntil = finished + SYNC_IO_BACKOFF_MS;
      this.#slowShare = 0;
    }
    return result;
  }

  /** Whether transfers have lately been slower than the page cache serves them. */
  missingCache(): boolean {
    return performance.now() < this.#asyncUntil || this.#slowShare > SYNC_IO_SLOW_SHARE / 2;
  }
}

export interface FileHandle {
  /**
   * Reads up to `length` bytes; fewer only at end of file. `alone`: no other I/O of the caller is
   * under way (a hint about how to wait).
   */
  read(buffer: Uint8Array, offset: number, length: number, position: number, alone?: boolean): Promise<number>;
  /**
   * Brings up to `length` bytes at `position` into the page cache, off the event loop, for a read
   * that comes soon; settles once they are there or the attempt failed. Does nothing while
   * transfers are served from the cache: reading ahead what is there already only costs CPU.
   */
  prefetch(position: number, length: number): Promise<void>;
  /** Writes all `length` bytes or throws; `alone` as for read(). */
  write(buffer: Uint8Array, offset: number, length: number, position: number, alone?: boolean): Promise<void>;
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  size(): Promise<number>;
  close(): Promise<void>;
}

/** 'create' opens read-write, creating the file if absent; 'createExclusive' fails with EEXIST. */
export type OpenMode = 'read' | 'readWrite' | 'create' | 'createExclusive';

export interface FileLayer {
  open(path: string, mode: OpenMode): Promise<FileHandle>;
  rename(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
  /** Creates the directory and its parents; no error if it exists. */
  mkdir(path: string): Promise<void>;
  readdir(path: string): Promise<string[]>;
  /** Makes creations, renames and unlinks in the directory durable. */
  syncDir(path: string): Promise<void>;
  /** Deallocates the range (it reads as zeros afterwards); false when not supported. */
  punchHole(path: string, offset: number, length: number): Promise<boolean>;
  /** Bytes available to this process on the file system holding `path`. */
  freeBytes(path: string): Promise<number>;
  /**
   * The largest size, up to `limit` and in whole 4 KiB blocks, that a file at `path` (created
   * for the test and removed) can have: ext4 with 4 KiB blocks stops 4 KiB short of 16 TiB.
   */
  largestFile(path: string, limit: number): Promise<number>;
}

const FLAGS: Record<OpenMode, number> = {
  read: constants.O_RDONLY,
  readWrite: constants.O_RDWR,
  create: constants.O_RDWR | constants.O_CREAT,
  createExclusive: constants.O_RDWR | constants.O_CREAT | constants.O_EXCL,
};

class NodeHandle implements FileHandle {
  readonly #handle: NodeFileHandle;
  readonly #policy: SyncIoPolicy;
  /**
   * Transfers on the pool use the bare descriptor, which FileHandle does not count: close waits
   * for them, or a descriptor number reused by another open could receive their bytes.
   */
  #onPool = 0;
  #drained: (() => void) | undefined;

  constructor(handle: NodeFileHandle, policy: SyncIoPolicy) {
    this.#handle = handle;
    this.#policy = policy;
  }

  async read(buffer: Uint8Array, offset: number, length: number, position: number, alone = false): Promise<number> {
    const fd = this.#handle.fd;
    const quick = this.#policy.attempt(length, () => readFully(fd, buffer, offset, length, position), alone && this.#policy.loneReadsWaitOnSpot);
    if (quick !== undefined) return quick;
    this.#onPool++;
    try {
      let done = 0;
      while (done < length) {
        const bytesRead = await readOnPool(fd, buffer, offset + done, length - done, position + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return done;
    } finally {
      this.#leavePool();
    }
  }

  async prefetch(position: number, length: number): Promise<void> {
    if (!this.#policy.missingCache()) return;
    const target = prefetchScratch();
    this.#onPool++;
    try {
      await readOnPool(this.#handle.fd, target, 0, Math.min(length, target.length), position);
    } finally {
      this.#leavePool();
    }
  }

  async write(buffer: Uint8Array, offset: number, length: number, position: number, alone = false): Promise<void> {
    const fd = this.#handle.fd;
    if (this.#policy.attempt(length, () => writeFully(fd, buffer, offset, length, position), alone) !== undefined) return;
    this.#onPool++;
    try {
      let done = 0;
      while (done < length) done += await writeOnPool(fd, buffer, offset + done, length - done, position + done);
    } finally {
      this.#leavePool();
    }
  }

  #leavePool(): void {
    if (--this.#onPool === 0) this.#drained?.();
  }

  sync(): Promise<void> {
    return this.#handle.sync();
  }

  truncate(length: number): Promise<void> {
    return this.#handle.truncate(length);
  }

  async size(): Promise<number> {
    return (await this.#handle.stat()).size;
  }

  async close(): Promise<void> {
    while (this.#onPool > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
    this.#drained = undefined;
    return this.#handle.close();
  }
}

/** Prefetches land here and are never looked at, so one buffer serves all of them at once. */
let scratch: Buffer | undefined;
const PREFETCH_MAX_BYTES = 1024 * 1024;

function prefetchScratch(): Buffer {
  scratch ??= allocateShifted(PREFETCH_MAX_BYTES);
  return scratch;
}

/** fs.read and fs.write with callbacks cost less CPU per call than FileHandle's promise methods. */
function readOnPool(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    read(fd, buffer, offset, length, position, (error, bytesRead) => (error === null ? resolve(bytesRead) : reject(error)));
  });
}

function writeOnPool(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    write(fd, buffer, offset, length, position, (error, bytesWritten) => (error === null ? resolve(bytesWritten) : reject(error)));
  });
}

function readFully(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number {
  let done = 0;
  while (done < length) {
    const read = readSync(fd, buffer, offset + done, length - done, position + done);
    if (read === 0) break;
    done += read;
  }
  return done;
}

function writeFully(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number {
  let done = 0;
  while (done < length) done += writeSync(fd, buffer, offset + done, length - done, position + done);
  return done;
}

/**
 * The FileLayer over node:fs/promises. `policy`: when transfers may run on the event loop; one per
 * layer, shared by its handles.
 */
export function nodeFileLayer(policy = new SyncIoPolicy()): FileLayer {
  let fallocateMissing = false;
  return {
    async open(path, mode) {
      return new NodeHandle(await open(path, FLAGS[mode], 0o600), policy);
    },
    rename,
    unlink,
    async mkdir(path) {
      await mkdir(path, { recursive: true });
    },
    readdir: (path) => readdir(path),
    async syncDir(path) {
      const handle = await open(path, constants.O_RDONLY);
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
    },
    punchHole(path, offset, length) {
      if (fallocateMissing) return Promise.resolve(false);
      const args = ['--punch-hole', '--offset', String(offset), '--length', String(length), path];
      return new Promise((resolve, reject) => {
        execFile('fallocate', args, (error) => {
          if (error === null) resolve(true);
          else if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
            fallocateMissing = true;
            resolve(false);
          } else reject(error);
        });
      });
    },
    async freeBytes(path) {
      const stats = await statfs(path);
      return stats.bavail * stats.bsize;
    },
    async largestFile(path, limit) {
      const handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC, 0o600);
      try {
        const fits = async (size: number): Promise<boolean> => {
          try {
            await handle.truncate(size);
            return true;
          } catch (error) {
            const code = (error as NodeJS.ErrnoException).code;
            if (code === 'EFBIG' || code === 'EINVAL') return false;
            throw error;
          }
        };
        if (await fits(limit)) return limit;
        let good = 0;
        let bad = Math.floor(limit / PROBE_BLOCK);
        while (bad - good > 1) {
          const middle = Math.floor((good + bad) / 2);
          if (await fits(middle * PROBE_BLOCK)) good = middle;
          else bad = middle;
        }
        return good * PROBE_BLOCK;
      } finally {
        await handle.close();
        await unlink(path);
      }
    },
  };
}
