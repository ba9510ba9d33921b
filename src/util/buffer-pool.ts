/**
 * Reusable I/O buffers for request payloads and read replies.
 *
 * Why: every freshly allocated Buffer is external memory to V8, and allocating it at the rate a
 * block server moves data (gigabytes a second) makes V8 run a full mark-compact every few tens of
 * milliseconds for "external memory pressure", on a heap of a few megabytes. Measured with 1 MiB
 * writes at QD8: 120 mark-compacts in 3 s, and V8's helper threads busy for half a core.
 *
 * Where a buffer starts matters as much: large allocations come from mmap with the data 16 bytes
 * into a page, and on the AMD EPYC machines here the kernel copies a page-aligned page-cache page
 * into such a buffer (pread) at 2.6 GB/s against 14 GB/s a cache line further on (the copy's
 * destination runs a few bytes behind its source within the page, which the CPU handles badly;
 * pwrite from such a buffer is as slow). So every buffer starts OFFSET bytes into its allocation.
 *
 * Buffers come in power-of-two classes; a released buffer waits for the next request of its class
 * unless the pool already holds `maxFreeBytes`. Only a buffer lent by this pool and not yet
 * returned is taken back, so releasing anything else, or twice, does nothing.
 */
export class BufferPool {
  readonly #maxFreeBytes: number;
  readonly #free = new Map<number, ArrayBuffer[]>();
  readonly #lent = new WeakSet<ArrayBuffer>();
  #freeBytes = 0;

  constructor(maxFreeBytes: number) {
    this.#maxFreeBytes = maxFreeBytes;
  }

  /** Bytes held for reuse. */
  get freeBytes(): number {
    return this.#freeBytes;
  }

  /** A buffer of `length` bytes with unspecified contents. */
  acquire(length: number): Buffer {
    const size = sizeClass(length);
    let backing = this.#free.get(size + OFFSET)?.pop();
    if (backing === undefined) backing = allocateShifted(size).buffer as ArrayBuffer;
    else this.#freeBytes -= backing.byteLength;
    this.#lent.add(backing);
    return Buffer.from(backing, OFFSET, length);
  }

  /** Gives a buffer from acquire() back; its contents may be reused at once. */
  release(buffer: Uint8Array): void {
    const backing = buffer.buffer;
    if (!(backing instanceof ArrayBuffer) || !this.#lent.has(backing)) return;
    this.#lent.delete(backing);
    if (this.#freeBytes + backing.byteLength > this.#maxFreeBytes) return;
    let list = this.#free.get(backing.byteLength);
    if (list === undefined) this.#free.set(backing.byteLength, (list = []));
    list.push(backing);
    this.#freeBytes += backing.byteLength;
  }
}

/** A buffer of `length` bytes that starts where copies into and out of it run at full speed. */
export function allocateShifted(length: number): Buffer {
  return Buffer.from(Buffer.allocUnsafeSlow(length + OFFSET).buffer, OFFSET, length);
}

const OFFSET = 64;

function sizeClass(length: number): number {
  return length <= 4096 ? 4096 : 2 ** Math.ceil(Math.log2(length));
}
