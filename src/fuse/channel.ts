/**
 * The /dev/fuse side: mounting, the read loops, replies and notifications.
 *
 * Mount. /dev/fuse is opened here and handed to `mount -i -t fuse.clonebd -o fd=3,...` as the
 * child's fd 3; the kernel ties the new mount to that open file. No fusermount, no libfuse, no
 * native code, so only root can mount (the CSI node runs as root). The kernel sends INIT first and
 * holds every other request of the mount until INIT is answered.
 *
 * Reading. A read of /dev/fuse blocks until the kernel has a request and returns exactly one; Node
 * has no way to poll it, so each of `readers` loops keeps one `fs.read` in flight, and each blocked
 * read holds a libuv pool thread: the process must run with UV_THREADPOOL_SIZE above `readers`
 * (the CLI checks). A loop handles its request to the end before it reads again, so a reader's
 * buffer is reused only once nothing refers to it any more, and `readers` bounds the requests in
 * progress: the rest wait in the kernel.
 *
 * Writing. A reply is one writev of its buffers (header and data without a copy). It is written
 * synchronously: the kernel takes a reply without waiting on anything of ours, so a pool thread
 * would only add a hop. A reply the kernel no longer wants (its request was interrupted, or the
 * mount is gone) fails with ENOENT or ENODEV and is dropped.
 *
 * End. Unmounting (umount, fusermount3 -u) ends the connection: every blocked read returns ENODEV
 * and `serve` resolves once all loops have stopped. A DESTROY, or an INIT we refuse, makes the
 * channel unmount itself to the same end.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync, read, writevSync } from 'node:fs';
import { decodeRequest, encodeNotifyInvalInode } from './protocol.js';
import { MAX_WRITE, type FileServer } from './file-server.js';

/** Room for the largest WRITE (its payload plus in_header and write_in) with a page to spare. */
const READ_BUFFER_SIZE = MAX_WRITE + 4096;
const MOUNT_TIMEOUT_MS = 60_000;

export interface ChannelLog {
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

function errorCode(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : undefined;
}

function readOnce(fd: number, buffer: Buffer): Promise<number> {
  return new Promise((resolve, reject) => {
    // position null: /dev/fuse is not seekable, pread would fail.
    read(fd, buffer, 0, buffer.length, null, (error, bytes) => (error === null ? resolve(bytes) : reject(error)));
  });
}

/** Runs a tool; resolves with its exit code and what it printed on stderr. */
function runTool(command: string, args: readonly string[], extraFd?: number): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const stdio: ('ignore' | 'pipe' | number)[] = ['ignore', 'ignore', 'pipe'];
    if (extraFd !== undefined) stdio.push(extraFd);
    const child = spawn(command, args, { stdio });
    const stderr: Buffer[] = [];
    child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), MOUNT_TIMEOUT_MS);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr: Buffer.concat(stderr).toString('utf8').trim() });
    });
  });
}

export interface MountOptions {
  /** An existing, empty directory. */
  mountpoint: string;
  /** What /proc/mounts shows as the mount's source. */
  source: string;
  uid: number;
  gid: number;
}

export class FuseChannel {
  readonly #fd: number;
  readonly mountpoint: string;
  #closed = false;

  private constructor(fd: number, mountpoint: string) {
    this.#fd = fd;
    this.mountpoint = mountpoint;
  }

  /** Opens /dev/fuse and mounts it on `mountpoint`; the kernel's INIT is then waiting to be read. */
  static async mount(options: MountOptions): Promise<FuseChannel> {
    const fd = openSync('/dev/fuse', 'r+');
    try {
      const mountOptions = [
        'fd=3',
        'rootmode=40000',
        `user_id=${options.uid}`,
        `group_id=${options.gid}`,
        // Others (the kernel's loop driver acting for any user, a pod's processes) may use the file;
        // the kernel checks the file's mode bits itself.
        'allow_other',
        'default_permissions',
      ].join(',');
      const result = await runTool('mount', ['-i', '-t', 'fuse.clonebd', '-o', mountOptions, options.source, options.mountpoint], fd);
      if (result.code !== 0) {
        throw new Error(`mount of ${options.mountpoint} failed (${result.code === null ? 'killed' : `exit ${result.code}`}): ${result.stderr}`);
      }
      return new FuseChannel(fd, options.mountpoint);
    } catch (error) {
      closeSync(fd);
      throw error;
    }
  }

  /**
   * Serves requests with `readers` loops until the kernel ends the connection (unmount, DESTROY,
   * or the kernel refusing our INIT). Resolves when every loop has stopped.
   */
  async serve(server: FileServer, readers: number, log: ChannelLog): Promise<void> {
    let ended = false;
    const loop = async (): Promise<void> => {
      const buffer = Buffer.allocUnsafe(READ_BUFFER_SIZE);
      while (!ended) {
        let bytes: number;
        try {
          bytes = await readOnce(this.#fd, buffer);
        } catch (error) {
          const code = errorCode(error);
          // ENOENT: the request was interrupted before we got it; EINTR/EAGAIN: try again.
          if (code === 'ENOENT' || code === 'EINTR' || code === 'EAGAIN') continue;
          if (code !== 'ENODEV') log.error({ err: error }, 'reading /dev/fuse failed: serving stops');
          ended = true;
          return;
        }
        const outcome = await server.handle(decodeRequest(buffer.subarray(0, bytes)));
        if (outcome.reply !== undefined) this.#write(outcome.reply, log);
        if (outcome.end && !ended) {
          ended = true;
          // The other loops wake (ENODEV) once the mount is gone; after a DESTROY it is going already.
          void this.unmount();
        }
      }
    };
    await Promise.all(Array.from({ length: readers }, loop));
  }

  #write(buffers: Buffer[], log: ChannelLog): void {
    if (this.#closed) return;
    try {
      writevSync(this.#fd, buffers);
    } catch (error) {
      const code = errorCode(error);
      if (code !== 'ENOENT' && code !== 'ENODEV') log.warn({ err: error }, 'a reply to the kernel failed');
    }
  }

  /**
   * Tells the kernel to drop the inode's cached attributes, so that the next stat (and then
   * `losetup -c`) sees a new size. An inode the kernel does not hold is nothing to drop (ENOENT).
   */
  invalidateAttributes(ino: number, log: ChannelLog): void {
    this.#write([encodeNotifyInvalInode(ino, -1, 0)], log);
  }

  /** Unmounts (not lazily: a busy mount stays); resolves with the error text, or undefined on success. */
  async unmount(): Promise<string | undefined> {
    const result = await runTool('umount', [this.mountpoint]).catch((error: Error) => ({ code: null, stderr: error.message }));
    return result.code === 0 ? undefined : result.stderr || `umount ${this.mountpoint} failed`;
  }

  /** Closes /dev/fuse: a mount still in place then fails every access (ENOTCONN) until unmounted. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeSync(this.#fd);
  }
}
