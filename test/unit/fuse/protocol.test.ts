/**
 * The FUSE message codec against bytes built from fuse.h's layouts by an independent builder:
 * requests decode to what they say, hostile bytes never make decoding throw, and every reply has
 * the length its struct has.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  OFFSET_BEYOND,
  decodeRequest,
  encodeAttr,
  encodeDirents,
  encodeEmpty,
  encodeEntry,
  encodeError,
  encodeInit,
  encodeNotifyInvalInode,
  encodeOpen,
  encodeReplyHeader,
  encodeStatfs,
  encodeWrite,
  type FuseAttr,
} from '../../../src/fuse/protocol.js';
import * as W from './fuse-wire.js';

const ATTR: FuseAttr = { ino: 2, size: 3 * 2 ** 32 + 4096, blocks: 7, time: 1_700_000_000, mode: 0o100600, nlink: 1, uid: 10, gid: 20, blksize: 4096 };

function decoded(message: Buffer) {
  const result = decodeRequest(message);
  if (result.kind !== 'request') throw new Error(`expected a request, got: ${result.reason}`);
  return result;
}

describe('FUSE request decoding', () => {
  it('reads the header and each body the server handles as the kernel lays them out', () => {
    const init = decoded(W.request(W.OP.INIT, 1n, 0, W.initBody(7, 45, 0x73fffffb)));
    expect(init.header).toMatchObject({ length: 104, opcode: W.OP.INIT, unique: 1n, nodeid: 0, pid: 1234 });
    expect(init.request).toEqual({ op: 'init', major: 7, minor: 45, maxReadahead: 131072, flags: 0x73fffffb });

    expect(decoded(W.request(W.OP.LOOKUP, 2n, 1, W.nameBody('disk'))).request).toEqual({ op: 'lookup', name: Buffer.from('disk') });
    expect(decoded(W.request(W.OP.READ, 3n, 2, W.readBody(2 ** 40 + 512, 131072))).request).toEqual({ op: 'read', offset: 2 ** 40 + 512, size: 131072 });
    const data = Buffer.from('hello, block');
    const write = decoded(W.request(W.OP.WRITE, 0xffff_ffff_ffff_fff0n, 2, W.writeBody(4096, data)));
    expect(write.header.unique).toBe(0xffff_ffff_ffff_fff0n);
    expect(write.request).toEqual({ op: 'write', offset: 4096, data });
    expect(decoded(W.request(W.OP.SETATTR, 4n, 2, W.setattrBody(8, 1 << 20))).request).toEqual({ op: 'setattr', valid: 8, size: 1 << 20 });
    expect(decoded(W.request(W.OP.OPEN, 5n, 2, W.openBody(2))).request).toEqual({ op: 'open', flags: 2 });
    expect(decoded(W.request(W.OP.OPENDIR, 6n, 1, W.openBody(0))).request).toEqual({ op: 'opendir', flags: 0 });
    expect(decoded(W.request(W.OP.READDIR, 7n, 1, W.readBody(2, 4096))).request).toEqual({ op: 'readdir', offset: 2, size: 4096 });
    expect(decoded(W.request(W.OP.FALLOCATE, 8n, 2, W.fallocateBody(8192, 65536, 3))).request).toEqual({
      op: 'fallocate',
      offset: 8192,
      length: 65536,
      mode: 3,
    });
    expect(decoded(W.request(W.OP.ACCESS, 9n, 1, W.accessBody(4))).request).toEqual({ op: 'access', mask: 4 });
    expect(decoded(W.request(W.OP.FSYNC, 10n, 2, W.fsyncBody())).request).toEqual({ op: 'fsync' });
    expect(decoded(W.request(W.OP.FLUSH, 11n, 2, W.releaseBody())).request).toEqual({ op: 'flush' });
    expect(decoded(W.request(W.OP.RELEASE, 12n, 2, W.releaseBody())).request).toEqual({ op: 'release' });
    expect(decoded(W.request(W.OP.RELEASEDIR, 13n, 1, W.releaseBody())).request).toEqual({ op: 'releasedir' });
    expect(decoded(W.request(W.OP.STATFS, 14n, 1)).request).toEqual({ op: 'statfs' });
    expect(decoded(W.request(W.OP.GETATTR, 15n, 2, Buffer.alloc(16))).request).toEqual({ op: 'getattr' });
    expect(decoded(W.request(W.OP.FORGET, 16n, 2, Buffer.alloc(8))).request).toEqual({ op: 'forget' });
    expect(decoded(W.request(W.OP.BATCH_FORGET, 17n, 0, W.batchForgetBody([[2n, 1n], [3n, 5n]]))).request).toEqual({ op: 'forget' });
    expect(decoded(W.request(W.OP.INTERRUPT, 18n, 0, W.interruptBody(3n))).request).toEqual({ op: 'interrupt' });
    expect(decoded(W.request(W.OP.DESTROY, 19n, 0)).request).toEqual({ op: 'destroy' });
    expect(decoded(W.request(W.OP.LSEEK, 20n, 2, Buffer.alloc(24))).request).toEqual({ op: 'unsupported' });
  });

  it('decodes 64-bit offsets past 2^53 as OFFSET_BEYOND, and nodeids too', () => {
    const read = decoded(W.request(W.OP.READ, 1n, 2, W.readBody(2n ** 63n, 4096)));
    expect(read.request).toEqual({ op: 'read', offset: OFFSET_BEYOND, size: 4096 });
    expect(decoded(W.request(W.OP.GETATTR, 1n, 2n ** 60n)).header.nodeid).toBe(OFFSET_BEYOND);
    const edge = decoded(W.request(W.OP.READ, 1n, 2, W.readBody(2 ** 53 - 1, 1)));
    expect(edge.request).toEqual({ op: 'read', offset: 2 ** 53 - 1, size: 1 });
  });

  it('calls malformed what the kernel cannot have sent, keeping the header to answer it', () => {
    expect(decodeRequest(Buffer.alloc(39))).toMatchObject({ kind: 'malformed', header: undefined });
    const mislabelled = W.request(W.OP.STATFS, 5n, 1, Buffer.alloc(0), 48);
    expect(decodeRequest(mislabelled)).toMatchObject({ kind: 'malformed', header: { unique: 5n } });
    const cases = [
      W.request(W.OP.INIT, 1n, 0, Buffer.alloc(12)),
      W.request(W.OP.LOOKUP, 1n, 1, Buffer.from('disk')),
      W.request(W.OP.READ, 1n, 2, Buffer.alloc(39)),
      W.request(W.OP.WRITE, 1n, 2, W.writeBody(0, Buffer.alloc(10), 11)),
      W.request(W.OP.WRITE, 1n, 2, W.writeBody(0, Buffer.alloc(10), 9)),
      W.request(W.OP.SETATTR, 1n, 2, Buffer.alloc(87)),
      W.request(W.OP.FALLOCATE, 1n, 2, Buffer.alloc(31)),
      W.request(W.OP.BATCH_FORGET, 1n, 0, W.batchForgetBody([[2n, 1n]]).subarray(0, 20)),
    ];
    for (const message of cases) expect(decodeRequest(message).kind, message.readUInt32LE(4).toString()).toBe('malformed');
  });

  it('never throws on random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 512 }), (bytes) => {
        decodeRequest(Buffer.from(bytes));
      }),
      { numRuns: 2000 },
    );
  });

  it('never throws on a valid request cut short, grown, or with any byte changed, and decodes it as malformed when the lengths disagree', () => {
    const valid = [
      W.request(W.OP.INIT, 1n, 0, W.initBody(7, 31, 0)),
      W.request(W.OP.LOOKUP, 2n, 1, W.nameBody('disk')),
      W.request(W.OP.WRITE, 3n, 2, W.writeBody(0, Buffer.alloc(64, 7))),
      W.request(W.OP.SETATTR, 4n, 2, W.setattrBody(8, 0)),
      W.request(W.OP.FALLOCATE, 5n, 2, W.fallocateBody(0, 4096, 3)),
      W.request(W.OP.BATCH_FORGET, 6n, 0, W.batchForgetBody([[2n, 1n]])),
    ];
    fc.assert(
      fc.property(
        fc.constantFrom(...valid),
        fc.nat(),
        fc.integer({ min: 0, max: 255 }),
        fc.constantFrom('cut', 'grow', 'change'),
        (message, position, byte, how) => {
          const at = position % message.length;
          if (how === 'cut') {
            expect(decodeRequest(message.subarray(0, at)).kind).toBe('malformed');
          } else if (how === 'grow') {
            expect(decodeRequest(Buffer.concat([message, Buffer.from([byte])])).kind).toBe('malformed');
          } else {
            const changed = Buffer.from(message);
            changed[at] = byte;
            decodeRequest(changed);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});

describe('FUSE replies', () => {
  const unique = 0x1122_3344_5566_7788n;

  it('carry the out header: total length, error, unique', () => {
    const error = W.parseReply(encodeError(unique, 28));
    expect(error).toMatchObject({ length: 16, error: -28, unique });
    expect(error.body.length).toBe(0);
    expect(W.parseReply(encodeEmpty(unique))).toMatchObject({ length: 16, error: 0, unique });
    const header = W.parseReply(encodeReplyHeader(unique, 1 << 20));
    expect(header).toMatchObject({ length: 16 + (1 << 20), error: 0, unique });
  });

  it('have the lengths of their fuse.h structs, fields where the kernel reads them', () => {
    const entry = encodeEntry(unique, ATTR, 1500);
    expect(entry.length).toBe(16 + 128);
    const entryBody = W.parseReply(entry).body;
    expect(entryBody.readBigUInt64LE(0)).toBe(2n);
    expect(entryBody.readBigUInt64LE(16)).toBe(1n);
    expect(entryBody.readUInt32LE(32)).toBe(500_000_000);
    expect(W.parseAttr(entryBody, 40)).toEqual({ ino: 2n, size: 3n * 2n ** 32n + 4096n, blocks: 7n, mode: 0o100600, nlink: 1, blksize: 4096 });

    const attr = encodeAttr(unique, ATTR, 1000);
    expect(attr.length).toBe(16 + 104);
    const attrBody = W.parseReply(attr).body;
    expect(attrBody.readBigUInt64LE(0)).toBe(1n);
    expect(W.parseAttr(attrBody, 16).size).toBe(3n * 2n ** 32n + 4096n);

    const init = encodeInit(unique, { minor: 31, maxReadahead: 4096, flags: 0x8000_0001, maxBackground: 16, congestionThreshold: 12, maxWrite: 1 << 20, maxPages: 256 });
    expect(init.length).toBe(16 + 64);
    const initBody = W.parseReply(init).body;
    expect([initBody.readUInt32LE(0), initBody.readUInt32LE(4), initBody.readUInt32LE(12)]).toEqual([7, 31, 0x8000_0001]);
    expect([initBody.readUInt16LE(16), initBody.readUInt16LE(18), initBody.readUInt32LE(20), initBody.readUInt16LE(28)]).toEqual([16, 12, 1 << 20, 256]);

    const open = W.parseReply(encodeOpen(unique, 1));
    expect([open.length, open.body.readUInt32LE(8)]).toEqual([32, 1]);
    const write = W.parseReply(encodeWrite(unique, 65536));
    expect([write.length, write.body.readUInt32LE(0)]).toEqual([24, 65536]);
    const statfs = W.parseReply(encodeStatfs(unique, { blocks: 2 ** 33, files: 2, blockSize: 4096, nameLength: 255 }));
    expect(statfs.length).toBe(16 + 80);
    expect([statfs.body.readBigUInt64LE(0), statfs.body.readUInt32LE(40), statfs.body.readUInt32LE(44), statfs.body.readUInt32LE(48)]).toEqual([2n ** 33n, 4096, 255, 4096]);
  });

  it('notify INVAL_INODE with unique 0 and the notify code where the error goes', () => {
    const notify = encodeNotifyInvalInode(2, -1, 0);
    const parsed = W.parseReply(notify);
    expect(parsed).toMatchObject({ length: 40, error: 2, unique: 0n });
    expect([parsed.body.readBigUInt64LE(0), parsed.body.readBigInt64LE(8), parsed.body.readBigInt64LE(16)]).toEqual([2n, -1n, 0n]);
  });

  it('list directory entries 8-byte aligned, whole ones only, each naming where to resume', () => {
    const entries = [
      { ino: 1, name: '.', type: 4 },
      { ino: 1, name: '..', type: 4 },
      { ino: 2, name: 'disk', type: 8 },
    ];
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 4 }), fc.integer({ min: 0, max: 200 }), (offset, size) => {
        const reply = W.parseReply(encodeDirents(unique, entries, offset, size));
        expect(reply.length).toBe(16 + reply.body.length);
        expect(reply.body.length).toBeLessThanOrEqual(size);
        expect(reply.body.length % 8).toBe(0);
        const listed = W.parseDirents(reply.body);
        const expected = entries.slice(offset).slice(0, listed.length);
        expect(listed.map((entry) => entry.name)).toEqual(expected.map((entry) => entry.name));
        listed.forEach((entry, index) => expect(entry.off).toBe(BigInt(offset + index + 1)));
        // Whole entries only: the next one would not have fitted.
        const next = entries[offset + listed.length];
        if (next !== undefined) expect(reply.body.length + Math.ceil((24 + next.name.length) / 8) * 8).toBeGreaterThan(size);
      }),
    );
  });
});
