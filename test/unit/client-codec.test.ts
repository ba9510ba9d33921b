/**
 * The client codec against bytes written out by hand from the spec's layouts. The builders
 * here share nothing with src/nbd/: magic numbers and field sizes are spelled out.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  NbdProtocolError,
  ReplyFramer,
  decodeExportNameReply,
  decodeOptionReply,
  decodeOptionReplyHeader,
  decodeServerGreeting,
  decodeSimpleReplyHeader,
  decodeStructuredChunk,
  decodeStructuredReplyHeader,
  encodeClientFlags,
  encodeExportNameOption,
  encodeInfoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  errorCodeForNbdError,
  errorCodeForOptionError,
  writeRequestHeader,
  type Reply,
} from '../../src/nbd/client-codec.js';

// --- an independent byte builder ------------------------------------------------------------
const u16 = (n: number): number[] => [(n >>> 8) & 0xff, n & 0xff];
const u32 = (n: number): number[] => [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
const u64 = (n: bigint): number[] => {
  const out: number[] = [];
  for (let shift = 56n; shift >= 0n; shift -= 8n) out.push(Number((n >> shift) & 0xffn));
  return out;
};
const ascii = (text: string): number[] => [...text].map((c) => c.charCodeAt(0));
const bytes = (...parts: number[][]): Buffer => Buffer.from(parts.flat());

const IHAVEOPT = ascii('IHAVEOPT');
const NBDMAGIC = ascii('NBDMAGIC');
const OPTION_REPLY_MAGIC = u64(0x3e889045565a9n);
const SIMPLE_MAGIC = [0x67, 0x44, 0x66, 0x98];
const STRUCTURED_MAGIC = [0x66, 0x8e, 0x33, 0xef];
const REQUEST_MAGIC = [0x25, 0x60, 0x95, 0x13];

const optionReply = (option: number, type: number, data: number[] = []): Buffer =>
  bytes(OPTION_REPLY_MAGIC, u32(option), u32(type), u32(data.length), data);
const structured = (flags: number, type: number, cookie: bigint, payload: number[]): Buffer =>
  bytes(STRUCTURED_MAGIC, u16(flags), u16(type), u64(cookie), u32(payload.length), payload);
const simple = (error: number, cookie: bigint, payload: number[] = []): Buffer =>
  bytes(SIMPLE_MAGIC, u32(error), u64(cookie), payload);

describe('client codec encoders', () => {
  it('encodes the client flags as a u32', () => {
    expect(encodeClientFlags(3)).toEqual(bytes(u32(3)));
  });

  it('encodes an option with no data (NBD_OPT_LIST)', () => {
    expect(encodeOption(3)).toEqual(bytes(IHAVEOPT, u32(3), u32(0)));
  });

  it('encodes NBD_OPT_EXPORT_NAME with the name as the whole data', () => {
    expect(encodeExportNameOption('disk')).toEqual(bytes(IHAVEOPT, u32(1), u32(4), ascii('disk')));
  });

  it('encodes NBD_OPT_GO with name length, name and info requests', () => {
    const expected = bytes(IHAVEOPT, u32(7), u32(4 + 4 + 2 + 6), u32(4), ascii('disk'), u16(3), u16(3), u16(1), u16(2));
    expect(encodeInfoOption(7, 'disk', [3, 1, 2])).toEqual(expected);
  });

  it('encodes NBD_OPT_INFO for the empty export name with no info requests', () => {
    expect(encodeInfoOption(6, '', [])).toEqual(bytes(IHAVEOPT, u32(6), u32(6), u32(0), u16(0)));
  });

  it('encodes UTF-8 names by byte length', () => {
    const name = [0xc3, 0xa9]; // "é"
    expect(encodeExportNameOption('é')).toEqual(bytes(IHAVEOPT, u32(1), u32(2), name));
  });

  it('encodes NBD_OPT_SET_META_CONTEXT with its queries', () => {
    const query = ascii('base:allocation');
    const data = [...u32(1), ...ascii('v'), ...u32(2), ...u32(query.length), ...query, ...u32(5), ...ascii('qemu:')];
    expect(encodeMetaContextOption(10, 'v', ['base:allocation', 'qemu:'])).toEqual(
      bytes(IHAVEOPT, u32(10), u32(data.length), data),
    );
  });

  it('encodes NBD_OPT_LIST_META_CONTEXT with zero queries', () => {
    expect(encodeMetaContextOption(9, 'v', [])).toEqual(bytes(IHAVEOPT, u32(9), u32(9), u32(1), ascii('v'), u32(0)));
  });

  it('encodes a request header with 64-bit offset and opaque cookie', () => {
    const request = { flags: 1, type: 1, cookie: 0x0102030405060708n, offset: 2 ** 40 + 5, length: 4096 };
    const expected = bytes(REQUEST_MAGIC, u16(1), u16(1), u64(0x0102030405060708n), u64(2n ** 40n + 5n), u32(4096));
    expect(encodeRequest(request)).toEqual(expected);
  });

  it('writes a request header at an offset inside a larger buffer', () => {
    const target = Buffer.alloc(32, 0xaa);
    writeRequestHeader(target, 4, { flags: 0x18, type: 7, cookie: 0xffffffffffffffffn, offset: 0, length: 0xffffffff });
    const expected = bytes([0xaa, 0xaa, 0xaa, 0xaa], REQUEST_MAGIC, u16(0x18), u16(7), u64(0xffffffffffffffffn), u64(0n), u32(0xffffffff));
    expect(target).toEqual(expected);
  });
});

describe('client codec decoders: handshake', () => {
  it('decodes the server greeting and its handshake flags', () => {
    expect(decodeServerGreeting(bytes(NBDMAGIC, IHAVEOPT, u16(3)))).toBe(3);
  });

  it('refuses a greeting with a bad magic or an oldstyle server', () => {
    expect(() => decodeServerGreeting(bytes(ascii('NBDMAGIX'), IHAVEOPT, u16(3)))).toThrow(NbdProtocolError);
    expect(() => decodeServerGreeting(bytes(NBDMAGIC, u64(0x00420281861253n), u16(0)))).toThrow(NbdProtocolError);
  });

  it('decodes the EXPORT_NAME reply', () => {
    expect(decodeExportNameReply(bytes(u64(1n << 30n), u16(0x0d6d)))).toEqual({ size: 1 << 30, flags: 0x0d6d });
  });

  const decode = (reply: Buffer) => decodeOptionReply(decodeOptionReplyHeader(reply.subarray(0, 20)), reply.subarray(20));

  it('decodes the option reply header', () => {
    expect(decodeOptionReplyHeader(optionReply(7, 1))).toEqual({ option: 7, type: 1, length: 0 });
    expect(() => decodeOptionReplyHeader(bytes(u64(0x1234n), u32(7), u32(1), u32(0)))).toThrow(NbdProtocolError);
  });

  it('decodes NBD_REP_ACK', () => {
    expect(decode(optionReply(8, 1))).toEqual({ type: 'ack', option: 8 });
  });

  it('decodes NBD_REP_SERVER with and without a description', () => {
    expect(decode(optionReply(3, 2, [...u32(4), ...ascii('disk'), ...ascii('my disk')]))).toEqual({
      type: 'server',
      option: 3,
      name: 'disk',
      description: 'my disk',
    });
    expect(decode(optionReply(3, 2, [...u32(1), ...ascii('a')]))).toEqual({ type: 'server', option: 3, name: 'a', description: '' });
  });

  it('refuses NBD_REP_SERVER whose name overruns the reply', () => {
    expect(() => decode(optionReply(3, 2, [...u32(9), ...ascii('disk')]))).toThrow(NbdProtocolError);
  });

  it('decodes every NBD_REP_INFO type', () => {
    expect(decode(optionReply(7, 3, [...u16(0), ...u64(1048576n), ...u16(0x4d)]))).toEqual({
      type: 'info',
      option: 7,
      info: { info: 'export', size: 1048576, flags: 0x4d },
    });
    expect(decode(optionReply(7, 3, [...u16(1), ...ascii('disk')]))).toEqual({
      type: 'info',
      option: 7,
      info: { info: 'name', name: 'disk' },
    });
    expect(decode(optionReply(6, 3, [...u16(2), ...ascii('hello')]))).toEqual({
      type: 'info',
      option: 6,
      info: { info: 'description', description: 'hello' },
    });
    expect(decode(optionReply(7, 3, [...u16(3), ...u32(1), ...u32(4096), ...u32(32 << 20)]))).toEqual({
      type: 'info',
      option: 7,
      info: { info: 'block-size', blockSizes: { minimum: 1, preferred: 4096, maximum: 32 << 20 } },
    });
    expect(decode(optionReply(7, 3, [...u16(99), 1, 2]))).toEqual({
      type: 'info',
      option: 7,
      info: { info: 'unknown', infoType: 99, data: Buffer.from([1, 2]) },
    });
  });

  it('refuses NBD_INFO_EXPORT of the wrong length', () => {
    expect(() => decode(optionReply(7, 3, [...u16(0), ...u64(1n)]))).toThrow(NbdProtocolError);
  });

  it('decodes NBD_REP_META_CONTEXT', () => {
    expect(decode(optionReply(10, 4, [...u32(1), ...ascii('base:allocation')]))).toEqual({
      type: 'meta-context',
      option: 10,
      id: 1,
      name: 'base:allocation',
    });
  });

  it('decodes error replies with their message, and unknown reply types', () => {
    expect(decode(optionReply(7, 0x80000006, ascii('no such export')))).toEqual({
      type: 'error',
      option: 7,
      replyType: 0x80000006,
      message: 'no such export',
    });
    expect(decode(optionReply(7, 77, [5]))).toEqual({ type: 'unknown', option: 7, replyType: 77, data: Buffer.from([5]) });
  });

  it('maps option errors to errno-style codes', () => {
    expect(errorCodeForOptionError(0x80000006)).toBe('ENOENT');
    expect(errorCodeForOptionError(0x80000001)).toBe('ENOTSUP');
    expect(errorCodeForOptionError(0x80000002)).toBe('EPERM');
    expect(errorCodeForOptionError(0x80000003)).toBe('EINVAL');
    expect(errorCodeForOptionError(0x80000007)).toBe('ESHUTDOWN');
  });
});

describe('client codec decoders: transmission', () => {
  it('decodes reply headers', () => {
    expect(decodeSimpleReplyHeader(simple(22, 7n))).toEqual({ error: 22, cookie: 7n });
    expect(decodeStructuredReplyHeader(structured(1, 2, 9n, []))).toEqual({ flags: 1, type: 2, cookie: 9n, length: 0 });
    expect(() => decodeSimpleReplyHeader(structured(1, 2, 9n, []))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredReplyHeader(simple(0, 1n))).toThrow(NbdProtocolError);
  });

  it('decodes NONE, OFFSET_DATA and OFFSET_HOLE chunks', () => {
    expect(decodeStructuredChunk(0, Buffer.alloc(0))).toEqual({ type: 'none' });
    expect(decodeStructuredChunk(1, bytes(u64(4096n), [1, 2, 3]))).toEqual({ type: 'data', offset: 4096, data: Buffer.from([1, 2, 3]) });
    expect(decodeStructuredChunk(2, bytes(u64(2n ** 33n), u32(65536)))).toEqual({ type: 'hole', offset: 2 ** 33, length: 65536 });
  });

  it('decodes a BLOCK_STATUS chunk', () => {
    expect(decodeStructuredChunk(5, bytes(u32(1), u32(4096), u32(0), u32(8192), u32(3)))).toEqual({
      type: 'block-status',
      contextId: 1,
      extents: [
        { length: 4096, flags: 0 },
        { length: 8192, flags: 3 },
      ],
    });
  });

  it('decodes ERROR and ERROR_OFFSET chunks, and unknown error types as errors', () => {
    expect(decodeStructuredChunk(0x8001, bytes(u32(22), u16(3), ascii('bad')))).toEqual({
      type: 'error',
      replyType: 0x8001,
      error: 22,
      message: 'bad',
    });
    expect(decodeStructuredChunk(0x8002, bytes(u32(5), u16(0), u64(512n)))).toEqual({
      type: 'error',
      replyType: 0x8002,
      error: 5,
      message: '',
      offset: 512,
    });
    expect(decodeStructuredChunk(0x8064, bytes(u32(28), u16(2), ascii('no'), [9, 9]))).toEqual({
      type: 'error',
      replyType: 0x8064,
      error: 28,
      message: 'no',
    });
  });

  it('passes unknown non-error chunk types through for the client to reject', () => {
    expect(decodeStructuredChunk(42, Buffer.from([1]))).toEqual({ type: 'unknown', replyType: 42, payload: Buffer.from([1]) });
  });

  it('refuses malformed chunks', () => {
    expect(() => decodeStructuredChunk(0, Buffer.from([0]))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(1, bytes(u64(0n)))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(2, bytes(u64(0n), u32(0)))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(5, bytes(u32(1)))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(5, bytes(u32(1), u32(1)))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(0x8001, bytes(u32(0), u16(0)))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(0x8001, bytes(u32(5), u16(9), ascii('x')))).toThrow(NbdProtocolError);
    expect(() => decodeStructuredChunk(0x8002, bytes(u32(5), u16(0)))).toThrow(NbdProtocolError);
  });

  it('maps NBD error values to codes, unknown ones to EINVAL', () => {
    const codes = [1, 5, 12, 22, 28, 75, 95, 108].map(errorCodeForNbdError);
    expect(codes).toEqual(['EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN']);
    expect(errorCodeForNbdError(200)).toBe('EINVAL');
  });
});

describe('ReplyFramer', () => {
  // Cookie -> payload length a successful simple reply carries (READ length, else 0).
  const expectedLengths = new Map<bigint, number>([
    [1n, 0],
    [2n, 5],
    [3n, 4096],
    [4n, 100],
  ]);
  const lookup = (cookie: bigint): number | undefined => expectedLengths.get(cookie);

  const stream = bytes(
    [...simple(0, 1n)],
    [...simple(0, 2n, [1, 2, 3, 4, 5])],
    [...simple(22, 3n)],
    [...structured(0, 1, 4n, [...u64(0n), 7, 7, 7])],
    [...structured(0, 2, 4n, [...u64(3n), ...u32(97)])],
    [...structured(0, 5, 5n, [...u32(1), ...u32(512), ...u32(3)])],
    [...structured(0, 0x8001, 5n, [...u32(5), ...u16(2), ...ascii('io')])],
    [...structured(1, 0, 4n, [])],
    [...structured(1, 0x8002, 6n, [...u32(28), ...u16(0), ...u64(8n)])],
  );
  const expected: Reply[] = [
    { kind: 'simple', cookie: 1n, error: 0, data: Buffer.alloc(0) },
    { kind: 'simple', cookie: 2n, error: 0, data: Buffer.from([1, 2, 3, 4, 5]) },
    { kind: 'simple', cookie: 3n, error: 22, data: Buffer.alloc(0) },
    { kind: 'structured', cookie: 4n, flags: 0, done: false, chunk: { type: 'data', offset: 0, data: Buffer.from([7, 7, 7]) } },
    { kind: 'structured', cookie: 4n, flags: 0, done: false, chunk: { type: 'hole', offset: 3, length: 97 } },
    { kind: 'structured', cookie: 5n, flags: 0, done: false, chunk: { type: 'block-status', contextId: 1, extents: [{ length: 512, flags: 3 }] } },
    { kind: 'structured', cookie: 5n, flags: 0, done: false, chunk: { type: 'error', replyType: 0x8001, error: 5, message: 'io' } },
    { kind: 'structured', cookie: 4n, flags: 1, done: true, chunk: { type: 'none' } },
    {
      kind: 'structured',
      cookie: 6n,
      flags: 1,
      done: true,
      chunk: { type: 'error', replyType: 0x8002, error: 28, message: '', offset: 8 },
    },
  ];
  const lookupWith6 = (cookie: bigint): number | undefined => (cookie === 6n ? 0 : lookup(cookie));

  const feedAll = (pieces: Buffer[]): Reply[] => {
    const framer = new ReplyFramer(lookupWith6);
    const replies = pieces.flatMap((piece) => framer.feed(piece));
    expect(framer.buffered).toBe(0);
    return replies;
  };

  it('frames a whole stream delivered at once', () => {
    expect(feedAll([stream])).toEqual(expected);
  });

  it('gives the same replies for the stream split at every boundary', () => {
    for (let at = 0; at <= stream.length; at++) {
      expect(feedAll([stream.subarray(0, at), stream.subarray(at)])).toEqual(expected);
    }
  });

  it('gives the same replies for the stream split at every pair of boundaries', () => {
    for (let i = 0; i <= stream.length; i++) {
      for (let j = i; j <= stream.length; j++) {
        const replies = feedAll([stream.subarray(0, i), stream.subarray(i, j), stream.subarray(j)]);
        if (replies.length !== expected.length) expect.fail(`split at ${i}, ${j}`);
      }
    }
    expect(feedAll([...stream].map((byte) => Buffer.from([byte])))).toEqual(expected);
  });

  it('gives the same replies under any random chunking', () => {
    fc.assert(
      fc.property(fc.uniqueArray(fc.integer({ min: 1, max: stream.length - 1 }), { maxLength: 30 }), (cuts) => {
        const points = [0, ...cuts.sort((a, b) => a - b), stream.length];
        const pieces = points.slice(1).map((end, k) => stream.subarray(points[k]!, end));
        expect(feedAll(pieces)).toEqual(expected);
      }),
    );
  });

  it('returns nothing until a reply is complete, then exactly that reply', () => {
    const framer = new ReplyFramer(lookup);
    const reply = simple(0, 3n, Array.from({ length: 4096 }, (_, k) => k & 0xff));
    expect(framer.feed(reply.subarray(0, 100))).toEqual([]);
    expect(framer.buffered).toBe(100);
    const [whole] = framer.feed(reply.subarray(100));
    expect(whole).toMatchObject({ kind: 'simple', cookie: 3n, error: 0 });
    expect(whole?.kind === 'simple' && whole.data).toEqual(reply.subarray(16));
  });

  it('throws on a bad magic', () => {
    const framer = new ReplyFramer(lookup);
    expect(() => framer.feed(bytes(u32(0xdeadbeef), u32(0), u64(1n)))).toThrow(NbdProtocolError);
  });

  it('throws on a simple reply to a cookie never sent', () => {
    const framer = new ReplyFramer(lookup);
    expect(() => framer.feed(simple(0, 99n))).toThrow(NbdProtocolError);
  });

  it('refuses an oversized structured chunk from its header, before buffering the payload', () => {
    const framer = new ReplyFramer(lookup, 1024);
    const header = bytes(STRUCTURED_MAGIC, u16(0), u16(1), u64(4n), u32(1025));
    expect(() => framer.feed(header)).toThrow(/exceeds/);
  });
});
