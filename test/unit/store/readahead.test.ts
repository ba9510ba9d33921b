import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { READAHEAD_BYTES, READAHEAD_STEP_BYTES, SequentialReadahead } from '../../../src/store/readahead.js';

const MiB = 1024 * 1024;

describe('sequential read-ahead', () => {
  it('starts with the second read in a row and reads ahead in steps', () => {
    const tracker = new SequentialReadahead();
    const size = 64 * MiB;
    expect(tracker.advance(0, MiB, size)).toBeUndefined();
    expect(tracker.advance(MiB, 2 * MiB, size)).toEqual([2 * MiB, 2 * MiB + READAHEAD_BYTES]);
    expect(tracker.advance(2 * MiB, 3 * MiB, size), 'less than a step to add').toBeUndefined();
    expect(tracker.advance(3 * MiB, 4 * MiB, size)).toEqual([2 * MiB + READAHEAD_BYTES, 4 * MiB + READAHEAD_BYTES]);
  });

  it('starts over after a read elsewhere, and stops at the end of the volume', () => {
    const tracker = new SequentialReadahead();
    const size = 12 * MiB;
    tracker.advance(0, MiB, size);
    tracker.advance(MiB, 2 * MiB, size);
    expect(tracker.advance(8 * MiB, 9 * MiB, size)).toBeUndefined();
    expect(tracker.advance(9 * MiB, 10 * MiB, size)).toEqual([10 * MiB, size]);
    expect(tracker.advance(10 * MiB, 11 * MiB, size)).toBeUndefined();
    expect(tracker.advance(11 * MiB, size, size)).toBeUndefined();
  });

  it('covers what lies ahead of a sequential reader once, in order, within the volume', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 64 }).map((blocks) => blocks * 4096 * 64),
        fc.array(fc.integer({ min: 1, max: 512 }).map((blocks) => blocks * 4096), { minLength: 2, maxLength: 80 }),
        (size, lengths) => {
          const tracker = new SequentialReadahead();
          const ranges: Array<[number, number]> = [];
          let at = 0;
          let secondEnd: number | undefined;
          for (const [index, length] of lengths.entries()) {
            if (at >= size) break;
            const to = Math.min(at + length, size);
            const range = tracker.advance(at, to, size);
            if (range !== undefined) ranges.push(range);
            if (index === 1) secondEnd = to;
            at = to;
          }
          for (const [index, [start, end]] of ranges.entries()) {
            expect(start).toBeLessThan(end);
            expect(end).toBeLessThanOrEqual(size);
            if (index > 0) expect(start, 'each range starts where the last one ended').toBe(ranges[index - 1]![1]);
          }
          if (secondEnd === undefined || secondEnd >= size) {
            expect(ranges).toEqual([]);
            return;
          }
          expect(ranges[0]?.[0]).toBe(secondEnd);
          const covered = ranges[ranges.length - 1]![1];
          expect(covered, 'never more than the window ahead of the reader').toBeLessThanOrEqual(at + READAHEAD_BYTES);
          expect(covered, 'never less than a step short of the window').toBeGreaterThanOrEqual(
            Math.min(size, at + READAHEAD_BYTES - READAHEAD_STEP_BYTES),
          );
        },
      ),
    );
  });
});
