/**
 * Reads for large requests that the page cache does not serve, on worker threads of our own.
 *
 * Why: with io_uring on, libuv 1.46 polls its submission ring from a kernel thread that keeps a
 * core busy while transfers keep going to the disk. A 1 MiB read through a deep clone is several
 * transfers, and in a profile of cold 1 MiB reads at depth 32 that thread took more than half the
 * server's CPU. A blocking pread on a thread of our own costs a wake-up each way and nothing while
 * it waits. Small requests stay with libuv, where io_uring wins (cold 4 KiB reads at QD32 gain
 * about 1.5x over its thread pool).
 *
 * The destination is shared memory (a SharedArrayBuffer), so the worker's pread lands where the
 * reply is sent from, with no copy back. Descriptors are the process's, so a worker reads the
 * caller's open file; the caller keeps it open until the read settles.
 */
import { Worker } from 'node:worker_threads';

/** The worker's whole program; inline, so it runs the same from sources and from the build. */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { readSync } = require('node:fs');
parentPort.on('message', (job) => {
  const target = new Uint8Array(job.memory, job.offset, job.length);
  let done = 0;
  try {
    while (done < job.length) {
      const got = readSync(job.fd, target, done, job.length - done, job.position + done);
      if (got === 0) break;
      done += got;
    }
    parentPort.postMessage({ id: job.id, done });
  } catch (error) {
    parentPort.postMessage({ id: job.id, code: error.code, message: error.message });
  }
});
`;

interface Reply {
  id: number;
  done?: number;
  code?: string;
  message?: string;
}

interface Pending {
  resolve(done: number): void;
  reject(error: Error): void;
}

interface Reader {
  worker: Worker;
  pending: Map<number, Pending>;
}

export class BulkReaders {
  readonly #most: number;
  readonly #readers: Reader[] = [];
  #nextId = 0;

  /** Starts up to `most` threads, each when every running one is busy. */
  constructor(most: number) {
    this.#most = most;
  }

  /** Reads up to `length` bytes at `position` of `fd` into `target`; fewer only at end of file. */
  read(fd: number, target: Uint8Array, position: number): Promise<number> {
    if (!(target.buffer instanceof SharedArrayBuffer)) throw new TypeError('a reader thread can only fill shared memory');
    const reader = this.#leastBusy();
    const id = this.#nextId++;
    // A read under way keeps the process alive, an idle thread does not.
    if (reader.pending.size === 0) reader.worker.ref();
    return new Promise((resolve, reject) => {
      reader.pending.set(id, { resolve, reject });
      reader.worker.postMessage({ id, fd, memory: target.buffer, offset: target.byteOffset, length: target.length, position });
    });
  }

  #leastBusy(): Reader {
    let best: Reader | undefined;
    for (const reader of this.#readers) if (best === undefined || reader.pending.size < best.pending.size) best = reader;
    if (best !== undefined && (best.pending.size === 0 || this.#readers.length === this.#most)) return best;
    return this.#start();
  }

  #start(): Reader {
    // Not the process's flags: --input-type=module, say, would make the program an ES module.
    const worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] });
    const reader: Reader = { worker, pending: new Map() };
    worker.on('message', (reply: Reply) => {
      const pending = reader.pending.get(reply.id);
      if (pending === undefined) return;
      reader.pending.delete(reply.id);
      if (reader.pending.size === 0) worker.unref();
      if (reply.done !== undefined) pending.resolve(reply.done);
      else pending.reject(Object.assign(new Error(reply.message), { code: reply.code }));
    });
    // A thread that died (out of memory, say) fails what it held; the next read starts another.
    worker.on('error', (error) => this.#lose(reader, error));
    worker.on('exit', (code) => this.#lose(reader, new Error(`a reader thread stopped (exit code ${code})`)));
    // After the listeners, since adding the first one refs the worker again.
    worker.unref();
    this.#readers.push(reader);
    return reader;
  }

  #lose(reader: Reader, error: Error): void {
    const at = this.#readers.indexOf(reader);
    if (at >= 0) this.#readers.splice(at, 1);
    const failure = Object.assign(error, { code: 'EIO' });
    for (const pending of reader.pending.values()) pending.reject(failure);
    reader.pending.clear();
  }
}
