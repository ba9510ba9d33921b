import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/nbd/byte-queue.js';

type Step =
  | { op: 'push'; bytes: Uint8Array }
  | { op: 'take'; n: number }
  | { op: 'peek'; n: number }
  | { op: 'skip'; n: number }
  | { op: 'takeInto'; n: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ op: fc.constant('push' as const), bytes: fc.uint8Array({ maxLength: 40 }) }),
  fc.record({ op: fc.constant('take' as const), n: fc.nat(60) }),
  fc.record({ op: fc.constant('peek' as const), n: fc.nat(60) }),
  fc.record({ op: fc.constant('skip' as const), n: fc.nat(60) }),
  fc.record({ op: fc.constant('takeInto' as const), n: fc.nat(60) }),
);

describe('ByteQueue', () => {
  it('behaves like one contiguous array of the pushed bytes', () => {
    fc.assert(
      fc.property(fc.array(step, { maxLength: 60 }), (steps) => {
        const queue = new ByteQueue();
        let model: number[] = [];
        for (const s of steps) {
          if (s.op === 'push') {
            queue.push(Buffer.from(s.bytes));
            model.push(...s.bytes);
          } else if (s.op === 'skip') {
            expect(queue.skip(s.n)).toBe(Math.min(s.n, model.length));
            model = model.slice(s.n);
          } else if (s.op === 'takeInto') {
            const target = Buffer.alloc(s.n + 3, 0xee);
            const copied = queue.takeInto(target, 3, s.n);
            expect(copied).toBe(Math.min(s.n, model.length));
            expect([...target.subarray(3, 3 + copied)]).toEqual(model.slice(0, copied));
            model = model.slice(copied);
          } else if (s.n > model.length) {
            expect(() => (s.op === 'take' ? queue.take(s.n) : queue.peek(s.n))).toThrow(RangeError);
          } else {
            const got = s.op === 'take' ? queue.take(s.n) : queue.peek(s.n);
            expect([...got]).toEqual(model.slice(0, s.n));
            if (s.op === 'take') model = model.slice(s.n);
          }
          expect(queue.length).toBe(model.length);
        }
      }),
    );
  });
});
