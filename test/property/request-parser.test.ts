import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import { RequestParser, type NbdRequest } from '../../src/nbd/server-transmission.js';

const MAX_PAYLOAD = 64;
const WRITE = 1;

interface WireRequest {
  flags: number;
  type: number;
  cookie: Uint8Array;
  offset: bigint;
  payload: Uint8Array;
}

/** Written from the spec's request layout, independently of the code under test. */
function encode(request: WireRequest): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(request.flags, 4);
  header.writeUInt16BE(request.type, 6);
  Buffer.from(request.cookie).copy(header, 8);
  header.writeBigUInt64BE(request.offset, 16);
  header.writeUInt32BE(request.payload.length, 24);
  return request.type === WRITE ? Buffer.concat([header, request.payload]) : header;
}

const wireRequest: fc.Arbitrary<WireRequest> = fc.record({
  flags: fc.integer({ min: 0, max: 0xffff }),
  type: fc.oneof(fc.constant(WRITE), fc.integer({ min: 0, max: 12 })),
  cookie: fc.uint8Array({ minLength: 8, maxLength: 8 }),
  offset: fc.oneof(fc.bigInt({ min: 0n, max: 2n ** 53n - 1n }), fc.bigInt({ min: 2n ** 53n, max: 2n ** 64n - 1n })),
  payload: fc.uint8Array({ maxLength: MAX_PAYLOAD + 16 }),
});

/** Cuts `bytes` at the given (sorted, deduplicated) positions. */
function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((cut) => cut % (bytes.length + 1)))].sort((a, b) => a - b);
  const pieces: Buffer[] = [];
  let start = 0;
  for (const point of [...points, bytes.length]) {
    pieces.push(bytes.subarray(start, point));
    start = point;
  }
  return pieces;
}

function parseAll(pieces: Buffer[]): NbdRequest[] {
  const parser = new RequestParser(MAX_PAYLOAD);
  const queue = new ByteQueue();
  const out: NbdRequest[] = [];
  for (const piece of pieces) {
    queue.push(Buffer.from(piece));
    for (let result = parser.next(queue); result !== undefined; result = parser.next(queue)) {
      if (result.kind === 'fatal') throw new Error(result.reason);
      out.push(result.request);
    }
  }
  expect(queue.length).toBe(0);
  return out;
}

describe('RequestParser', () => {
  it('parses any request stream the same however it is split into chunks', () => {
    fc.assert(
      fc.property(fc.array(wireRequest, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 30 }), (requests, cuts) => {
        const stream = Buffer.concat(requests.map(encode));
        const parsed = parseAll(split(stream, cuts));
        expect(parsed).toHaveLength(requests.length);
        parsed.forEach((got, index) => {
          const sent = requests[index]!;
          expect(got.type).toBe(sent.type);
          expect(got.flags).toBe(sent.flags);
          expect([...got.cookie]).toEqual([...sent.cookie]);
          expect(got.offset).toBe(sent.offset < 2n ** 53n ? Number(sent.offset) : -1);
          expect(got.length).toBe(sent.payload.length);
          const oversize = sent.type === WRITE && sent.payload.length > MAX_PAYLOAD;
          expect(got.payloadTooLarge === true).toBe(oversize);
          if (sent.type === WRITE && !oversize && sent.payload.length > 0) {
            expect([...got.payload!]).toEqual([...sent.payload]);
          } else {
            expect(got.payload).toBeUndefined();
          }
        });
      }),
    );
  });

  it('splits a stream at every single boundary and still parses it', () => {
    const requests: WireRequest[] = [
      { flags: 1, type: WRITE, cookie: new Uint8Array(8).fill(7), offset: 4096n, payload: new Uint8Array(40).fill(9) },
      { flags: 0, type: 0, cookie: new Uint8Array(8).fill(1), offset: 0n, payload: new Uint8Array(0) },
      { flags: 0, type: WRITE, cookie: new Uint8Array(8).fill(2), offset: 0n, payload: new Uint8Array(MAX_PAYLOAD + 5) },
      { flags: 0, type: 3, cookie: new Uint8Array(8).fill(3), offset: 0n, payload: new Uint8Array(0) },
    ];
    const stream = Buffer.concat(requests.map(encode));
    const whole = parseAll([stream]);
    for (let cut = 0; cut <= stream.length; cut++) {
      const parsed = parseAll(split(stream, [cut]));
      expect(parsed.map((r) => [r.type, r.length, r.payloadTooLarge])).toEqual(
        whole.map((r) => [r.type, r.length, r.payloadTooLarge]),
      );
    }
    expect(whole.map((r) => r.type)).toEqual([WRITE, 0, WRITE, 3]);
  });

  it('parses the same when reads land in one reused scratch buffer or straight into the payload', () => {
    fc.assert(
      fc.property(
        fc.array(wireRequest, { maxLength: 8 }),
        fc.array(fc.integer({ min: 1, max: 100 }), { minLength: 1, maxLength: 30 }),
        fc.integer({ min: 1, max: MAX_PAYLOAD }),
        (requests, readSizes, directMinimum) => {
          const stream = Buffer.concat(requests.map(encode));
          const parser = new RequestParser(MAX_PAYLOAD);
          const queue = new ByteQueue();
          const scratch = Buffer.alloc(100);
          const parsed: NbdRequest[] = [];
          const drain = (): void => {
            for (let result = parser.next(queue); result !== undefined; result = parser.next(queue)) {
              if (result.kind === 'fatal') throw new Error(result.reason);
              parsed.push(result.request);
            }
          };
          let at = 0;
          for (let read = 0; at < stream.length; read++) {
            const size = readSizes[read % readSizes.length]!;
            const space = queue.length === 0 ? parser.payloadSpace(directMinimum) : undefined;
            if (space !== undefined) {
              const count = Math.min(size, space.length, stream.length - at);
              stream.copy(space, 0, at, at + count);
              parser.payloadReceived(count);
              at += count;
              drain();
              continue;
            }
            const count = Math.min(size, scratch.length, stream.length - at);
            stream.copy(scratch, 0, at, at + count);
            at += count;
            queue.push(scratch.subarray(0, count));
            drain();
            queue.detach();
            scratch.fill(0xee);
          }
          expect(queue.length).toBe(0);
          expect(parsed.map((r) => [r.type, r.length, r.payloadTooLarge === true])).toEqual(
            requests.map((r) => [r.type, r.payload.length, r.type === WRITE && r.payload.length > MAX_PAYLOAD]),
          );
          parsed.forEach((got, index) => {
            if (got.payload !== undefined) expect([...got.payload]).toEqual([...requests[index]!.payload]);
          });
        },
      ),
    );
  });

  it('refuses payload bytes outside the space it offered', () => {
    const parser = new RequestParser(MAX_PAYLOAD);
    const queue = new ByteQueue();
    expect(() => parser.payloadReceived(1)).toThrow(RangeError);
    queue.push(encode({ flags: 0, type: WRITE, cookie: new Uint8Array(8), offset: 0n, payload: new Uint8Array(10) }).subarray(0, 28));
    expect(parser.next(queue)).toBeUndefined();
    expect(parser.payloadSpace(11)).toBeUndefined();
    expect(parser.payloadSpace(10)?.length).toBe(10);
    expect(() => parser.payloadReceived(11)).toThrow(RangeError);
  });

  it('reports a bad magic as fatal', () => {
    const bytes = encode({ flags: 0, type: 0, cookie: new Uint8Array(8), offset: 0n, payload: new Uint8Array(0) });
    bytes.writeUInt32BE(0x12345678, 0);
    const queue = new ByteQueue();
    queue.push(bytes);
    expect(new RequestParser(MAX_PAYLOAD).next(queue)).toMatchObject({ kind: 'fatal' });
  });
});
