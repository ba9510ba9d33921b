/**
 * The sans-IO parsers on hostile input: random bytes, in random pieces. They never throw, and what
 * they keep buffered stays within a fixed bound however much a peer sends or claims it will send.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import { ServerHandshake } from '../../src/nbd/server-handshake.js';
import { RequestParser } from '../../src/nbd/server-transmission.js';

const MAX_PAYLOAD = 4096;
const MAX_OPTION = 1024;
/** An option header: IHAVEOPT, option, length. */
const OPTION_HEADER = 16;
const REQUEST_HEADER = 28;
const NBD_REQUEST_MAGIC = Buffer.from([0x25, 0x60, 0x95, 0x13]);

function pieces(bytes: Uint8Array, sizes: readonly number[]): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const size of sizes) {
    if (at >= bytes.length) break;
    out.push(Buffer.from(bytes.subarray(at, at + size)));
    at += size;
  }
  if (at < bytes.length) out.push(Buffer.from(bytes.subarray(at)));
  return out;
}

const sizes = fc.array(fc.integer({ min: 1, max: 300 }), { maxLength: 40 });

/** Mostly request headers with the right magic, so the fuzz gets past the first check. */
const requestish = fc
  .array(
    fc.oneof(
      fc.uint8Array({ minLength: 24, maxLength: 24 }).map((rest) => Buffer.concat([NBD_REQUEST_MAGIC, rest])),
      fc.uint8Array({ maxLength: 200 }).map((bytes) => Buffer.from(bytes)),
    ),
    { maxLength: 30 },
  )
  .map((parts) => Buffer.concat(parts));

describe('fuzzing the request parser', () => {
  it('never throws, and buffers at most one header and one maximum payload', () => {
    fc.assert(
      fc.property(requestish, sizes, (bytes, split) => {
        const parser = new RequestParser(MAX_PAYLOAD);
        const queue = new ByteQueue();
        for (const piece of pieces(bytes, split)) {
          queue.push(piece);
          for (let result = parser.next(queue); result !== undefined; result = parser.next(queue)) {
            if (result.kind === 'fatal') return;
            expect(result.request.payload?.length ?? 0).toBeLessThanOrEqual(MAX_PAYLOAD);
          }
          expect(queue.length, 'bytes left waiting for a whole request').toBeLessThan(REQUEST_HEADER + MAX_PAYLOAD);
        }
      }),
      { numRuns: 2000 },
    );
  });
});

describe('fuzzing the handshake', () => {
  const exports = [{ name: 'a', size: 1 << 20, readOnly: false, description: '' }];
  const machine = (): ServerHandshake =>
    new ServerHandshake({
      catalog: { describe: (name) => exports.find((e) => e.name === name), list: () => exports },
      defaultExportName: 'a',
      blockSizes: { minimum: 1, preferred: 4096, maximum: 32 << 20 },
      maxOptionLength: MAX_OPTION,
    });
  const IHAVEOPT = Buffer.from('IHAVEOPT');
  const flags = Buffer.from([0, 0, 0, 3]);
  /** Client flags, then things that look like options: the right magic, any option, any length. */
  const optionish = fc
    .array(
      fc.oneof(
        fc
          .record({ option: fc.integer({ min: 0, max: 16 }), declared: fc.oneof(fc.nat(64), fc.nat()), data: fc.uint8Array({ maxLength: 80 }) })
          .map(({ option, declared, data }) => {
            const header = Buffer.alloc(8);
            header.writeUInt32BE(option, 0);
            header.writeUInt32BE(declared >>> 0, 4);
            return Buffer.concat([IHAVEOPT, header, data]);
          }),
        fc.uint8Array({ maxLength: 40 }).map((bytes) => Buffer.from(bytes)),
      ),
      { maxLength: 20 },
    )
    .map((parts) => Buffer.concat([flags, ...parts]));

  it('never throws, and buffers at most one option of the allowed size', () => {
    fc.assert(
      fc.property(fc.oneof(optionish, fc.uint8Array({ maxLength: 2000 })), sizes, (bytes, split) => {
        const handshake = machine();
        const queue = new ByteQueue();
        for (const piece of pieces(bytes, split)) {
          queue.push(piece);
          const step = handshake.advance(queue);
          if (step.outcome !== undefined) return;
          expect(queue.length, 'bytes left waiting for a whole option').toBeLessThanOrEqual(4 + OPTION_HEADER + MAX_OPTION);
        }
      }),
      { numRuns: 2000 },
    );
  });
});
