/**
 * Read-ahead for the sparse layers of a clone read front to back.
 *
 * Why: a megabyte of a depth-32 clone is the base's range (one sequential read, which the kernel
 * reads ahead by itself) plus a few 4 KiB blocks of the levels, each at its own place on the disk
 * and each too far from the level's last block for the kernel to read it ahead. A request then
 * waits for its slowest block, so at a small queue depth a cold sequential reader is held to the
 * disk's random-read latency (measured here: 1 MiB reads of a depth-32 clone at 0.5-0.7x of its
 * base at QD1, 0.7-0.8x at QD8, and even at QD32). Reading those blocks into the page cache a few
 * megabytes before the reader arrives takes their latency off its path. The file layer skips
 * read-ahead while the page cache serves transfers, where it would only cost CPU.
 *
 * A volume has one tracker; a read that starts where the last one ended continues the stream, any
 * other starts a new one. Only the second sequential read in a row starts reading ahead, so random
 * and one-off reads cost nothing.
 */

/** How far ahead of a sequential reader other layers' blocks are read. */
export const READAHEAD_BYTES = 8 * 1024 * 1024;
/** Read ahead in steps of at least this much, so each step's map walk covers many requests. */
export const READAHEAD_STEP_BYTES = 2 * 1024 * 1024;

export class SequentialReadahead {
  #next = -1;
  #streak = 0;
  /** Everything before this has been read ahead for the current stream. */
  #ahead = 0;

  /**
   * Notes a read of [from, to) within a volume of `size` bytes; returns the range to read ahead
   * now, or undefined.
   */
  advance(from: number, to: number, size: number): [number, number] | undefined {
    if (from === this.#next) {
      this.#streak++;
    } else {
      this.#streak = 0;
      this.#ahead = to;
    }
    this.#next = to;
    if (this.#streak === 0) return undefined;
    const start = Math.max(this.#ahead, to);
    const end = Math.min(to + READAHEAD_BYTES, size);
    if (end - start < Math.min(READAHEAD_STEP_BYTES, size - start) || end <= start) return undefined;
    this.#ahead = end;
    return [start, end];
  }
}
