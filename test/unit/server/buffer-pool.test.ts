import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../../../src/util/buffer-pool.js';

describe('BufferPool', () => {
  it('never lends one buffer to two holders, and keeps at most its limit for reuse', () => {
    fc.assert(
      fc.property(
        fc.array(fc.oneof(fc.record({ acquire: fc.integer({ min: 1, max: 300_000 }) }), fc.record({ release: fc.nat() })), {
          maxLength: 60,
        }),
        (steps) => {
          const limit = 1 << 20;
          const pool = new BufferPool(limit);
          const held: Buffer[] = [];
          for (const step of steps) {
            if ('acquire' in step) {
              const buffer = pool.acquire(step.acquire);
              expect(buffer.length).toBe(step.acquire);
              for (const other of held) expect(other.buffer).not.toBe(buffer.buffer);
              held.push(buffer);
            } else if (held.length > 0) {
              pool.release(held.splice(step.release % held.length, 1)[0]!);
            }
            expect(pool.freeBytes).toBeLessThanOrEqual(limit);
          }
        },
      ),
    );
  });

  it('reuses a released buffer for the next request of its size class', () => {
    const pool = new BufferPool(1 << 24);
    const first = pool.acquire(1 << 20);
    pool.release(first);
    expect(pool.freeBytes).toBeGreaterThanOrEqual(1 << 20);
    const second = pool.acquire((1 << 20) - 100);
    expect(second.buffer).toBe(first.buffer);
    expect(pool.freeBytes).toBe(0);
  });

  it('starts every buffer a cache line into its allocation, away from the page start malloc gives', () => {
    const pool = new BufferPool(1 << 24);
    for (const length of [100, 4096, 65_536, 1 << 20]) expect(pool.acquire(length).byteOffset).toBe(64);
  });

  it('ignores buffers it did not lend and buffers released twice', () => {
    const pool = new BufferPool(1 << 24);
    pool.release(Buffer.alloc(8192));
    expect(pool.freeBytes).toBe(0);
    const lent = pool.acquire(8192);
    pool.release(lent);
    const heldForOne = pool.freeBytes;
    expect(heldForOne).toBeGreaterThanOrEqual(8192);
    pool.release(lent);
    expect(pool.freeBytes).toBe(heldForOne);
    const a = pool.acquire(8192);
    const b = pool.acquire(8192);
    expect(a.buffer).not.toBe(b.buffer);
  });
});
