/**
 * Bytes received but not yet consumed, kept as the chunks the socket delivered.
 *
 * Reading a fixed-size header returns a view into the first chunk when it holds the whole
 * header, and copies only when the header spans chunks; nothing is concatenated per chunk.
 */
export class ByteQueue {
  #chunks: Buffer[] = [];
  /** Offset of the first unconsumed byte in `#chunks[0]`. */
  #head = 0;
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /** The next `n` bytes without consuming them; a view when they lie in one chunk. */
  peek(n: number): Buffer {
    if (n > this.#length) throw new RangeError(`peek(${n}) beyond ${this.#length} queued bytes`);
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= n) {
      return first.subarray(this.#head, this.#head + n);
    }
    const out = Buffer.allocUnsafe(n);
    this.#copyInto(out, 0, n);
    return out;
  }

  /** Consumes and returns the next `n` bytes; a view when they lie in one chunk. */
  take(n: number): Buffer {
    const bytes = this.peek(n);
    this.skip(n);
    return bytes;
  }

  /** Consumes up to `n` bytes into `target` at `targetOffset`; returns how many were copied. */
  takeInto(target: Buffer, targetOffset: number, n: number): number {
    const count = Math.min(n, this.#length);
    this.#copyInto(target, targetOffset, count);
    this.skip(count);
    return count;
  }

  /**
   * Copies what is queued into one buffer of its own: after this, the chunks pushed so far may be
   * overwritten by whoever lent them.
   */
  detach(): void {
    if (this.#length === 0) return;
    const copy = Buffer.allocUnsafe(this.#length);
    this.#copyInto(copy, 0, this.#length);
    this.#chunks = [copy];
    this.#head = 0;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    let remaining = Math.min(n, this.#length);
    const skipped = remaining;
    while (remaining > 0) {
      const first = this.#chunks[0]!;
      const available = first.length - this.#head;
      if (available > remaining) {
        this.#head += remaining;
        break;
      }
      remaining -= available;
      this.#chunks.shift();
      this.#head = 0;
    }
    this.#length -= skipped;
    return skipped;
  }

  #copyInto(target: Buffer, targetOffset: number, n: number): void {
    let copied = 0;
    let head = this.#head;
    for (const chunk of this.#chunks) {
      if (copied === n) break;
      const count = Math.min(chunk.length - head, n - copied);
      chunk.copy(target, targetOffset + copied, head, head + count);
      copied += count;
      head = 0;
    }
  }
}

/** Reads a u64 as a JS number, or returns -1 when it is not a safe integer. */
export function readSafeU64(buffer: Buffer, offset: number): number {
  const high = buffer.readUInt32BE(offset);
  const low = buffer.readUInt32BE(offset + 4);
  if (high > 0x1fffff) return -1;
  return high * 0x100000000 + low;
}

export function writeU64(buffer: Buffer, value: number, offset: number): void {
  buffer.writeUInt32BE(Math.floor(value / 0x100000000), offset);
  buffer.writeUInt32BE(value >>> 0, offset + 4);
}
