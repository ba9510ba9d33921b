/**
 * The one-file filesystem's answers, request by request, against a byte-array model of the backing
 * file: what the kernel would send (built from fuse.h's layouts), what the kernel gets back, and
 * what reaches the backing file, durability included.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FileServer, type BackingFile, type Outcome } from '../../../src/fuse/file-server.js';
import { decodeRequest } from '../../../src/fuse/protocol.js';
import * as W from './fuse-wire.js';

const ROOT = 1;
const FILE = 2;
const KEEP_SIZE = 0x01;
const PUNCH_HOLE = 0x02;
const COLLAPSE_RANGE = 0x08;
const ZERO_RANGE = 0x10;

/** A backing file in memory: `data` is what was written, `durable` what the last flush covered. */
class MemoryFile implements BackingFile {
  data: Uint8Array;
  durable: Uint8Array;
  readOnly: boolean;
  zeroes: { offset: number; length: number; punch: boolean }[] = [];
  failWith: string | undefined;
  /** When set, a flush waits for this before it covers anything. */
  flushGate: Promise<void> | undefined;

  constructor(size: number, readOnly = false) {
    this.data = new Uint8Array(size);
    this.durable = new Uint8Array(size);
    this.readOnly = readOnly;
  }

  get size(): number {
    return this.data.length;
  }

  grow(size: number): void {
    const grown = new Uint8Array(size);
    grown.set(this.data);
    this.data = grown;
  }

  #check(offset: number, length: number): void {
    if (this.failWith !== undefined) throw Object.assign(new Error('backing failure'), { code: this.failWith });
    if (offset + length > this.data.length) throw new Error(`model: access past the end ${offset}+${length}`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.#check(offset, length);
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.#check(offset, data.length);
    this.data.set(data, offset);
  }

  async flush(): Promise<void> {
    this.#check(0, 0);
    const covered = this.data.slice();
    await this.flushGate;
    this.durable = covered;
  }

  async zero(offset: number, length: number, options: { punch: boolean }): Promise<void> {
    this.#check(offset, length);
    this.zeroes.push({ offset, length, punch: options.punch });
    this.data.fill(0, offset, offset + length);
  }
}

let nextUnique = 100n;

function harness(backing: MemoryFile) {
  const server = new FileServer(backing, { uid: 1000, gid: 1000 });
  const send = async (opcode: number, nodeid: number, body?: Buffer): Promise<Outcome> => {
    nextUnique += 1n;
    return server.handle(decodeRequest(W.request(opcode, nextUnique, nodeid, body)));
  };
  /** The reply as one buffer, its unique checked against the request's. */
  const ask = async (opcode: number, nodeid: number, body?: Buffer): Promise<W.Reply> => {
    const outcome = await send(opcode, nodeid, body);
    expect(outcome.reply, `opcode ${opcode} got no reply`).toBeDefined();
    const message = Buffer.concat(outcome.reply!);
    const reply = W.parseReply(message);
    expect(reply.length).toBe(message.length);
    expect(reply.unique).toBe(nextUnique);
    return reply;
  };
  const init = async (): Promise<W.Reply> => ask(W.OP.INIT, 0, W.initBody(7, 45, 0xffff_ffff));
  return { server, send, ask, init };
}

async function ready(backing: MemoryFile) {
  const h = harness(backing);
  expect((await h.init()).error).toBe(0);
  return h;
}

describe('FUSE file server', () => {
  it('answers INIT with its version, the flags it uses, 1 MiB writes, and refuses anything before INIT', async () => {
    const h = harness(new MemoryFile(4096));
    expect((await h.ask(W.OP.GETATTR, FILE)).error).toBe(-W.ERR.EIO);
    const reply = await h.init();
    expect(reply.error).toBe(0);
    expect(reply.body.length).toBe(64);
    expect([reply.body.readUInt32LE(0), reply.body.readUInt32LE(4)]).toEqual([7, 31]);
    const flags = reply.body.readUInt32LE(12);
    // ASYNC_READ, BIG_WRITES, ASYNC_DIO, MAX_PAGES; never WRITEBACK_CACHE (1 << 16).
    expect(flags).toBe((1 << 0) | (1 << 5) | (1 << 15) | (1 << 22));
    expect([reply.body.readUInt32LE(20), reply.body.readUInt16LE(28)]).toEqual([1 << 20, 256]);
    expect(h.server.initialised).toBe(true);

    const older = await harness(new MemoryFile(4096)).ask(W.OP.INIT, 0, W.initBody(7, 26, 1 << 22));
    expect(older.body.readUInt32LE(4)).toBe(26);
    expect(older.body.readUInt32LE(12)).toBe(1 << 22);
    const newerMajor = await harness(new MemoryFile(4096)).ask(W.OP.INIT, 0, W.initBody(8, 1, 0));
    expect([newerMajor.error, newerMajor.body.length, newerMajor.body.readUInt32LE(0)]).toEqual([0, 8, 7]);
    const tooOld = await harness(new MemoryFile(4096)).send(W.OP.INIT, 0, W.initBody(7, 12, 0));
    expect(tooOld.end).toBe(true);
    expect(W.parseReply(tooOld.reply![0]!).error).toBe(-W.ERR.EPROTO);
  });

  it('holds one file, disk, in a read-only root directory', async () => {
    const backing = new MemoryFile(3 * 4096 + 100);
    const h = await ready(backing);
    const entry = await h.ask(W.OP.LOOKUP, ROOT, W.nameBody('disk'));
    expect(entry.error).toBe(0);
    expect(entry.body.readBigUInt64LE(0)).toBe(BigInt(FILE));
    expect(W.parseAttr(entry.body, 40)).toMatchObject({ ino: 2n, size: BigInt(3 * 4096 + 100), blocks: 25n, mode: 0o100600, nlink: 1 });
    expect((await h.ask(W.OP.LOOKUP, ROOT, W.nameBody('other'))).error).toBe(-W.ERR.ENOENT);
    expect((await h.ask(W.OP.LOOKUP, FILE, W.nameBody('disk'))).error).toBe(-W.ERR.ENOTDIR);
    expect(W.parseAttr((await h.ask(W.OP.GETATTR, ROOT)).body, 16).mode).toBe(0o40555);
    expect((await h.ask(W.OP.GETATTR, 9)).error).toBe(-W.ERR.ENOENT);

    const dir = await h.ask(W.OP.OPENDIR, ROOT, W.openBody(0));
    expect(dir.error).toBe(0);
    const listing = W.parseDirents((await h.ask(W.OP.READDIR, ROOT, W.readBody(0, 4096))).body);
    expect(listing.map((entry) => [entry.name, entry.ino, entry.type])).toEqual([
      ['.', 1n, 4],
      ['..', 1n, 4],
      ['disk', 2n, 8],
    ]);
    expect(W.parseDirents((await h.ask(W.OP.READDIR, ROOT, W.readBody(3, 4096))).body)).toEqual([]);
    expect((await h.ask(W.OP.OPENDIR, FILE, W.openBody(0))).error).toBe(-W.ERR.ENOTDIR);
    expect((await h.ask(W.OP.OPEN, ROOT, W.openBody(0))).error).toBe(-W.ERR.EISDIR);
    // Nothing can be created: the kernel's CREATE and MKNOD are ENOSYS.
    expect((await h.ask(W.OP.CREATE, ROOT, Buffer.alloc(16))).error).toBe(-W.ERR.ENOSYS);
    expect((await h.ask(W.OP.MKNOD, ROOT, Buffer.alloc(16))).error).toBe(-W.ERR.ENOSYS);

    const statfs = (await h.ask(W.OP.STATFS, ROOT)).body;
    expect([statfs.readBigUInt64LE(0), statfs.readBigUInt64LE(8), statfs.readUInt32LE(40)]).toEqual([4n, 0n, 4096]);
  });

  it('opens the file direct-I/O, so the page cache never holds stale data', async () => {
    const h = await ready(new MemoryFile(4096));
    const open = await h.ask(W.OP.OPEN, FILE, W.openBody(2));
    expect(open.error).toBe(0);
    expect(open.body.readUInt32LE(8) & 1).toBe(1);
    for (const op of [W.OP.FLUSH, W.OP.RELEASE]) expect((await h.ask(op, FILE, W.releaseBody())).error).toBe(0);
    expect((await h.ask(W.OP.RELEASEDIR, ROOT, W.releaseBody())).error).toBe(0);
  });

  it('reads and writes like a regular file of fixed size, matching a byte-array model', async () => {
    const size = 64 * 1024 + 512;
    type Op = { kind: 'write'; offset: number; data: Uint8Array } | { kind: 'read'; offset: number; size: number } | { kind: 'fsync' };
    const op: fc.Arbitrary<Op> = fc.oneof(
      fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: size + 4096 }), data: fc.uint8Array({ maxLength: 9000 }) }),
      fc.record({ kind: fc.constant('read' as const), offset: fc.integer({ min: 0, max: size + 4096 }), size: fc.integer({ min: 0, max: 70_000 }) }),
      fc.record({ kind: fc.constant('fsync' as const) }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const backing = new MemoryFile(size);
        const model = new Uint8Array(size);
        const h = await ready(backing);
        for (const step of ops) {
          if (step.kind === 'write') {
            const reply = await h.ask(W.OP.WRITE, FILE, W.writeBody(step.offset, Buffer.from(step.data)));
            if (step.offset + step.data.length > size) {
              // The file cannot grow by writing.
              expect(reply.error).toBe(step.offset >= size ? -W.ERR.ENOSPC : -W.ERR.EFBIG);
            } else {
              expect(reply.error).toBe(0);
              expect(reply.body.readUInt32LE(0)).toBe(step.data.length);
              model.set(step.data, step.offset);
            }
          } else if (step.kind === 'read') {
            const reply = await h.ask(W.OP.READ, FILE, W.readBody(step.offset, step.size));
            if (step.size > 1 << 20) {
              expect(reply.error).toBe(-W.ERR.EINVAL);
            } else {
              expect(reply.error).toBe(0);
              expect(reply.body.equals(model.subarray(Math.min(step.offset, size), Math.min(step.offset + step.size, size)))).toBe(true);
            }
          } else {
            expect((await h.ask(W.OP.FSYNC, FILE, W.fsyncBody())).error).toBe(0);
            expect(Buffer.from(backing.durable).equals(model)).toBe(true);
          }
        }
        expect(Buffer.from(backing.data).equals(model)).toBe(true);
      }),
      { numRuns: 60 },
    );
  });

  it('answers FSYNC only once the backing flush is done', async () => {
    const backing = new MemoryFile(8192);
    const h = await ready(backing);
    expect((await h.ask(W.OP.WRITE, FILE, W.writeBody(0, Buffer.alloc(4096, 9)))).error).toBe(0);
    let release!: () => void;
    backing.flushGate = new Promise((resolve) => (release = resolve));
    let answered = false;
    const fsync = h.send(W.OP.FSYNC, FILE, W.fsyncBody()).then((outcome) => {
      answered = true;
      return outcome;
    });
    // Let every other pending callback run: the reply must still wait for the flush.
    await new Promise((resolve) => setImmediate(resolve));
    expect(answered).toBe(false);
    expect(backing.durable[0]).toBe(0);
    release();
    expect(W.parseReply((await fsync).reply![0]!).error).toBe(0);
    expect(backing.durable[4095]).toBe(9);
  });

  it('turns a punched hole and a zeroed range into zeroing, and refuses what would change the size', async () => {
    const backing = new MemoryFile(1 << 20);
    backing.data.fill(0xaa);
    const h = await ready(backing);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(4096, 8192, PUNCH_HOLE | KEEP_SIZE))).error).toBe(0);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(65536, 4096, ZERO_RANGE | KEEP_SIZE))).error).toBe(0);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(131072, 4096, ZERO_RANGE))).error).toBe(0);
    // Past the end with KEEP_SIZE: only what lies inside is zeroed.
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody((1 << 20) - 4096, 65536, PUNCH_HOLE | KEEP_SIZE))).error).toBe(0);
    expect(backing.zeroes).toEqual([
      { offset: 4096, length: 8192, punch: true },
      { offset: 65536, length: 4096, punch: false },
      { offset: 131072, length: 4096, punch: false },
      { offset: (1 << 20) - 4096, length: 4096, punch: true },
    ]);
    expect(backing.data.subarray(4096, 12288).every((byte) => byte === 0)).toBe(true);
    expect(backing.data[4095]).toBe(0xaa);
    expect(backing.data[12288]).toBe(0xaa);

    // Plain allocation inside the file has nothing to do.
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(0, 4096, 0))).error).toBe(0);
    expect(backing.zeroes).toHaveLength(4);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody((1 << 20) - 10, 4096, 0))).error).toBe(-W.ERR.EFBIG);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(0, 4096, PUNCH_HOLE))).error).toBe(-W.ERR.EOPNOTSUPP);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(0, 4096, COLLAPSE_RANGE))).error).toBe(-W.ERR.EOPNOTSUPP);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(0, 0, ZERO_RANGE))).error).toBe(-W.ERR.EINVAL);
    expect(backing.zeroes).toHaveLength(4);
  });

  it('accepts SETATTR of the current size and of times only; no other size, mode or owner', async () => {
    const backing = new MemoryFile(8192);
    const h = await ready(backing);
    const SIZE = 1 << 3;
    const MODE = 1 << 0;
    const ATIME_MTIME = (1 << 4) | (1 << 5);
    const same = await h.ask(W.OP.SETATTR, FILE, W.setattrBody(SIZE, 8192));
    expect(same.error).toBe(0);
    expect(W.parseAttr(same.body, 16).size).toBe(8192n);
    expect((await h.ask(W.OP.SETATTR, FILE, W.setattrBody(ATIME_MTIME, 0))).error).toBe(0);
    expect((await h.ask(W.OP.SETATTR, FILE, W.setattrBody(SIZE, 0))).error).toBe(-W.ERR.EPERM);
    expect((await h.ask(W.OP.SETATTR, FILE, W.setattrBody(SIZE, 16384))).error).toBe(-W.ERR.EPERM);
    expect((await h.ask(W.OP.SETATTR, FILE, W.setattrBody(MODE, 0, 0o100777))).error).toBe(-W.ERR.EPERM);
    expect(backing.size).toBe(8192);
  });

  it('shows a grown backing file at its new size, and takes writes up to the new end', async () => {
    const backing = new MemoryFile(8192);
    const h = await ready(backing);
    expect((await h.ask(W.OP.WRITE, FILE, W.writeBody(8192, Buffer.alloc(4096, 1)))).error).toBe(-W.ERR.ENOSPC);
    backing.grow(16384);
    expect(W.parseAttr((await h.ask(W.OP.GETATTR, FILE)).body, 16).size).toBe(16384n);
    expect((await h.ask(W.OP.WRITE, FILE, W.writeBody(8192, Buffer.alloc(4096, 1)))).error).toBe(0);
    expect((await h.ask(W.OP.READ, FILE, W.readBody(12288, 8192))).body.length).toBe(4096);
    const statfs = (await h.ask(W.OP.STATFS, ROOT)).body;
    expect(statfs.readBigUInt64LE(0)).toBe(4n);
  });

  it('maps backing failures to errno replies: out of space stays ENOSPC, a lost connection is EIO', async () => {
    const backing = new MemoryFile(8192);
    const seen: string[] = [];
    const server = new FileServer(backing, { uid: 0, gid: 0, onError: (op) => seen.push(op) });
    await server.handle(decodeRequest(W.request(W.OP.INIT, 1n, 0, W.initBody(7, 31, 0))));
    const errorOf = async (message: Buffer): Promise<number> => W.parseReply(Buffer.concat((await server.handle(decodeRequest(message))).reply!)).error;
    backing.failWith = 'ENOSPC';
    expect(await errorOf(W.request(W.OP.WRITE, 2n, FILE, W.writeBody(0, Buffer.alloc(512))))).toBe(-W.ERR.ENOSPC);
    backing.failWith = 'ECONNRESET';
    expect(await errorOf(W.request(W.OP.READ, 3n, FILE, W.readBody(0, 512)))).toBe(-W.ERR.EIO);
    expect(await errorOf(W.request(W.OP.FSYNC, 4n, FILE, W.fsyncBody()))).toBe(-W.ERR.EIO);
    backing.failWith = 'ENOTSUP';
    expect(await errorOf(W.request(W.OP.FALLOCATE, 5n, FILE, W.fallocateBody(0, 512, PUNCH_HOLE | KEEP_SIZE)))).toBe(-W.ERR.EOPNOTSUPP);
    expect(seen).toEqual(['write', 'read', 'fsync', 'fallocate']);
  });

  it('serves a read-only export read-only', async () => {
    const h = await ready(new MemoryFile(8192, true));
    expect(W.parseAttr((await h.ask(W.OP.GETATTR, FILE)).body, 16).mode).toBe(0o100400);
    expect((await h.ask(W.OP.OPEN, FILE, W.openBody(0))).error).toBe(0);
    expect((await h.ask(W.OP.OPEN, FILE, W.openBody(2))).error).toBe(-W.ERR.EROFS);
    expect((await h.ask(W.OP.WRITE, FILE, W.writeBody(0, Buffer.alloc(1)))).error).toBe(-W.ERR.EROFS);
    expect((await h.ask(W.OP.FALLOCATE, FILE, W.fallocateBody(0, 512, ZERO_RANGE))).error).toBe(-W.ERR.EROFS);
    expect((await h.ask(W.OP.ACCESS, FILE, W.accessBody(2))).error).toBe(-W.ERR.EACCES);
    expect((await h.ask(W.OP.ACCESS, FILE, W.accessBody(4))).error).toBe(0);
  });

  it('answers unknown opcodes ENOSYS and garbled requests EINVAL, and never answers FORGET or INTERRUPT', async () => {
    const h = await ready(new MemoryFile(8192));
    expect((await h.ask(W.OP.GETXATTR, FILE, Buffer.alloc(8))).error).toBe(-W.ERR.ENOSYS);
    expect((await h.ask(W.OP.READLINK, FILE)).error).toBe(-W.ERR.ENOSYS);
    expect((await h.ask(W.OP.READ, FILE, Buffer.alloc(8))).error).toBe(-W.ERR.EINVAL);
    expect((await h.send(W.OP.FORGET, FILE, Buffer.alloc(8))).reply).toBeUndefined();
    expect((await h.send(W.OP.BATCH_FORGET, 0, W.batchForgetBody([[2n, 1n]]))).reply).toBeUndefined();
    expect((await h.send(W.OP.INTERRUPT, 0, W.interruptBody(5n))).reply).toBeUndefined();
    expect((await h.send(W.OP.INTERRUPT, 0, Buffer.alloc(3))).reply).toBeUndefined();
    expect((await h.server.handle(decodeRequest(Buffer.alloc(10)))).reply).toBeUndefined();
    const destroy = await h.send(W.OP.DESTROY, 0);
    expect(destroy.end).toBe(true);
    expect(W.parseReply(destroy.reply![0]!).error).toBe(0);
  });

  it('never rejects, whatever bytes arrive, and every reply is as long as its header says', async () => {
    const backing = new MemoryFile(1 << 16);
    const h = await ready(backing);
    const header = fc.record({
      opcode: fc.oneof(fc.constantFrom(...Object.values(W.OP)), fc.nat()),
      nodeid: fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat()),
      body: fc.uint8Array({ maxLength: 200 }),
    });
    await fc.assert(
      fc.asyncProperty(fc.oneof(header.map(({ opcode, nodeid, body }) => W.request(opcode, 77n, nodeid, Buffer.from(body))), fc.uint8Array({ maxLength: 300 }).map((bytes) => Buffer.from(bytes))), async (message) => {
        const outcome = await h.server.handle(decodeRequest(message));
        if (outcome.reply === undefined) return;
        const reply = Buffer.concat(outcome.reply);
        expect(reply.readUInt32LE(0)).toBe(reply.length);
        expect(reply.readBigUInt64LE(8)).toBe(message.readBigUInt64LE(8));
      }),
      { numRuns: 1500 },
    );
  });
});
