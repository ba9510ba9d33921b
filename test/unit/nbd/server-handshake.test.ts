import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../../src/nbd/byte-queue.js';
import { ServerHandshake, type HandshakeOutcome } from '../../../src/nbd/server-handshake.js';

const IHAVEOPT = Buffer.from('IHAVEOPT', 'ascii');
const REPLY_MAGIC = Buffer.from('0003e889045565a9', 'hex');

const exports = [
  { name: 'default', size: 1 << 20, readOnly: false, description: 'the demo' },
  { name: 'snap', size: 4096, readOnly: true, description: '' },
];

function handshake(maxOptionLength = 1024): ServerHandshake {
  return new ServerHandshake({
    catalog: { describe: (name) => exports.find((e) => e.name === name), list: () => exports },
    defaultExportName: 'default',
    blockSizes: { minimum: 1, preferred: 4096, maximum: 32 << 20 },
    maxOptionLength,
  });
}

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

function option(type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([IHAVEOPT, u32(type), u32(data.length), data]);
}

function infoData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

function metaData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...queries.flatMap((q) => [u32(q.length), Buffer.from(q)])]);
}

interface Reply {
  option: number;
  type: number;
  data: Buffer;
}

function parseReplies(bytes: Buffer): Reply[] {
  const replies: Reply[] = [];
  let at = 0;
  while (at < bytes.length) {
    expect(bytes.subarray(at, at + 8)).toEqual(REPLY_MAGIC);
    const length = bytes.readUInt32BE(at + 16);
    replies.push({ option: bytes.readUInt32BE(at + 8), type: bytes.readUInt32BE(at + 12), data: bytes.subarray(at + 20, at + 20 + length) });
    at += 20 + length;
  }
  return replies;
}

function run(input: Buffer, chunking: number[] = [input.length], maxOptionLength?: number): { output: Buffer; outcome?: HandshakeOutcome } {
  const machine = handshake(maxOptionLength);
  const queue = new ByteQueue();
  const output: Buffer[] = [];
  let outcome: HandshakeOutcome | undefined;
  let at = 0;
  for (const size of chunking) {
    queue.push(input.subarray(at, at + size));
    at += size;
    const step = machine.advance(queue);
    output.push(...step.output);
    outcome ??= step.outcome;
  }
  return { output: Buffer.concat(output), outcome };
}

const ERR = 0x80000000;
const err = (n: number): number => (ERR | n) >>> 0;

describe('ServerHandshake', () => {
  it('greets with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', () => {
    expect(handshake().greeting().toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
  });

  it('closes on unknown client flags', () => {
    expect(run(u32(4)).outcome).toMatchObject({ kind: 'close' });
  });

  it('answers a full negotiation identically however the input is split', () => {
    const input = Buffer.concat([
      u32(3),
      option(8),
      option(99, Buffer.from('junk')),
      option(10, metaData('default', ['base:allocation', 'qemu:dirty-bitmap:x'])),
      option(3),
      option(6, infoData('snap', [1, 2, 3])),
      option(7, infoData('', [3])),
    ]);
    const whole = run(input);
    for (let cut = 1; cut < input.length; cut++) {
      const pieces = run(input, [cut, input.length - cut]);
      expect(pieces.output.equals(whole.output)).toBe(true);
      expect(pieces.outcome).toEqual(whole.outcome);
    }
    const byteByByte = run(input, Array.from({ length: input.length }, () => 1));
    expect(byteByByte.output.equals(whole.output)).toBe(true);

    const replies = parseReplies(whole.output);
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [8, 1],
      [99, err(1)],
      [10, 4],
      [10, 1],
      [3, 2],
      [3, 2],
      [3, 1],
      [6, 3],
      [6, 3],
      [6, 3],
      [6, 1],
      [7, 3],
      [7, 3],
      [7, 1],
    ]);
    expect(replies[2]!.data.subarray(4).toString()).toBe('base:allocation');
    expect(whole.outcome).toMatchObject({
      kind: 'transmission',
      negotiated: { export: { name: 'default' }, structuredReplies: true },
    });
    if (whole.outcome?.kind !== 'transmission') throw new Error('no transmission');
    // SET_META_CONTEXT named "default" but GO asked for "": the selection does not carry over.
    expect(whole.outcome.negotiated.metaContexts.size).toBe(0);
  });

  it('EXPORT_NAME sends size, flags and 124 zero bytes unless NO_ZEROES was agreed', () => {
    const name = Buffer.from('default');
    const withZeroes = run(Buffer.concat([u32(1), option(1, name)]));
    expect(withZeroes.output.length).toBe(8 + 2 + 124);
    expect(withZeroes.output.readBigUInt64BE(0)).toBe(1n << 20n);
    const noZeroes = run(Buffer.concat([u32(3), option(1, name)]));
    expect(noZeroes.output.length).toBe(10);
    expect(run(Buffer.concat([u32(3), option(1, Buffer.from('nope'))])).outcome).toMatchObject({ kind: 'close' });
  });

  it('skips oversized option data without buffering it and refuses it with ERR_TOO_BIG', () => {
    const big = Buffer.alloc(5000, 0x41);
    const input = Buffer.concat([u32(1), option(6, big), option(8)]);
    const result = run(input, Array.from({ length: Math.ceil(input.length / 100) }, () => 100), 1024);
    expect(parseReplies(result.output).map((r) => [r.option, r.type])).toEqual([
      [6, err(9)],
      [8, 1],
    ]);
  });

  it('selects base:allocation for GO on the export named in SET_META_CONTEXT', () => {
    const input = Buffer.concat([u32(1), option(8), option(10, metaData('snap', ['base:allocation'])), option(7, infoData('snap'))]);
    const result = run(input);
    if (result.outcome?.kind !== 'transmission') throw new Error('no transmission');
    expect([...result.outcome.negotiated.metaContexts.values()]).toEqual(['base:allocation']);
    expect(result.outcome.negotiated.transmissionFlags & 2).toBe(2);
  });
});
