/**
 * Transmission-phase obligations of the NBD spec (NBD-FACTS items 14–25 and the SHOULD list),
 * checked with a raw socket against an in-process NbdServer over an in-memory catalog whose
 * volumes can park, fail and inspect every storage call. After each error case the same
 * connection must still work.
 */
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/server/index.js';
import { GiB, MemoryCatalog, MiB, protocolTestExports, type MemoryVolumeSpec } from '../helpers/memory-catalog.js';
import {
  RawPeer,
  decodeRead,
  openTransmission,
  replyError,
  within,
  type DecodedRead,
  type PeerTarget,
  type ReplyMessage,
  type Transmission,
} from '../helpers/raw-peer.js';
import * as W from '../helpers/wire.js';

const { Cmd, CmdFlag, TxFlag, Errno, ReplyType, StateFlag } = W;

let catalog: MemoryCatalog;
let server: NbdServer;
let serverClosed = false;
let target: PeerTarget;
const peers: RawPeer[] = [];

async function startServer(specs: MemoryVolumeSpec[]): Promise<void> {
  catalog = new MemoryCatalog(specs);
  server = new NbdServer({ catalog, logger: pino({ level: 'silent' }) });
  serverClosed = false;
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  if (typeof address === 'string') throw new Error('expected a TCP address');
  target = { host: '127.0.0.1', port: address.port };
}

beforeEach(async () => {
  await startServer(protocolTestExports());
});

afterEach(async () => {
  for (const peer of peers.splice(0)) peer.destroy();
  catalog.releaseAll();
  if (!serverClosed) await server.close();
});

let cookieCounter = 0x5a00000000000000n;
function nextCookie(): Buffer {
  cookieCounter += 0x0101n;
  return W.cookie(cookieCounter);
}

interface OpenOptions {
  structured?: boolean;
  meta?: boolean;
}

async function open(exportName: string, options: OpenOptions = {}): Promise<Transmission> {
  const t = await openTransmission(target, {
    exportName,
    structured: options.structured === true || options.meta === true,
    metaContexts: options.meta === true ? ['base:allocation'] : undefined,
    infos: [W.Info.NBD_INFO_BLOCK_SIZE],
  });
  peers.push(t.peer);
  return t;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

async function read(peer: RawPeer, offset: number, length: number, flags = 0): Promise<DecodedRead> {
  const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, flags, cookie: nextCookie(), offset, length });
  const decoded = decodeRead(messages, offset, length);
  expect(decoded.problems).toEqual([]);
  if (peer.structured) for (const m of messages) expect(m.kind, 'READ reply must be structured').toBe('chunk');
  return decoded;
}

async function command(peer: RawPeer, fields: Omit<W.RequestFields, 'cookie'>): Promise<number> {
  const cookie = nextCookie();
  const messages = await peer.roundTrip({ ...fields, cookie });
  checkNonReadReply(messages, cookie);
  return replyError(messages);
}

/** Framing rules for replies to anything but READ: one simple reply, or chunks ending with DONE. */
function checkNonReadReply(messages: readonly ReplyMessage[], cookie: Buffer): void {
  expect(messages.length).toBeGreaterThan(0);
  messages.forEach((m, index) => {
    expect(m.cookie.equals(cookie)).toBe(true);
    if (m.kind === 'simple') {
      expect(messages).toHaveLength(1);
      expect(m.data).toBeUndefined();
      return;
    }
    const last = index === messages.length - 1;
    expect((m.flags & W.NBD_REPLY_FLAG_DONE) !== 0, 'DONE only and always on the last chunk').toBe(last);
    if (W.isErrorChunkType(m.type)) {
      const chunk = W.parseErrorChunk(m.type, m.payload);
      expect(chunk.error).not.toBe(0);
      expect(W.isValidNbdString(chunk.message)).toBe(true);
    }
  });
}

async function write(peer: RawPeer, offset: number, data: Buffer, flags = 0): Promise<number> {
  return command(peer, { type: Cmd.NBD_CMD_WRITE, flags, offset, payload: data });
}

/** The connection still answers: a READ of the first 4 KiB succeeds. */
async function expectUsable(peer: RawPeer, volumeName = 'data'): Promise<void> {
  const result = await read(peer, 0, 4096);
  expect(result.error).toBe(0);
  expect(result.data?.equals(catalog.volume(volumeName).bytes(0, 4096))).toBe(true);
}

function disc(peer: RawPeer): void {
  peer.sendRequest({ type: Cmd.NBD_CMD_DISC, cookie: nextCookie() });
}

const modes = [
  { label: 'simple replies', structured: false },
  { label: 'structured replies', structured: true },
] as const;

describe('transmission (facts 14–25)', () => {
  describe('fact 14: cookies and ordering', () => {
    for (const mode of modes) {
      it(`fact 14: every command's reply echoes the cookie exactly (${mode.label})`, async () => {
        const { peer } = await open('data', { structured: mode.structured });
        const cookies = [
          W.cookie(0n),
          W.cookie(0xffffffffffffffffn),
          W.cookie(0x0102030405060708n),
          W.cookie(0x8000000000000001n),
          W.cookie(0x00000000deadbeefn),
          Buffer.from([0x00, 0xff, 0x80, 0x7f, 0x01, 0xfe, 0x20, 0x00]),
          W.cookie(0x0020000000000001n),
        ];
        const requests: Array<Omit<W.RequestFields, 'cookie'>> = [
          { type: Cmd.NBD_CMD_READ, offset: 0, length: 512 },
          { type: Cmd.NBD_CMD_WRITE, offset: 4096, payload: pattern(512, 1) },
          { type: Cmd.NBD_CMD_FLUSH },
          { type: Cmd.NBD_CMD_TRIM, offset: 65536, length: 4096 },
          { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 8192, length: 4096 },
          { type: Cmd.NBD_CMD_CACHE, offset: 0, length: 4096 },
          { type: Cmd.NBD_CMD_READ, offset: 100, length: 3000 },
        ];
        requests.forEach((r, i) => peer.sendRequest({ ...r, cookie: cookies[i] as Buffer }));
        const { byCookie } = await peer.collect(cookies);
        for (const c of cookies) {
          const messages = byCookie.get(c.toString('hex')) ?? [];
          expect(messages.length).toBeGreaterThan(0);
          for (const m of messages) expect(m.cookie.equals(c)).toBe(true);
        }
      });
    }

    it('fact 14: requests run concurrently and a later one is answered while an earlier one is still in storage', async () => {
      for (const mode of modes) {
        const { peer } = await open('data', { structured: mode.structured });
        const volume = catalog.volume('data');
        volume.fill(0, pattern(65536, 2));
        const hold = volume.hold('read', (c) => c.offset === 0);
        const slow = nextCookie();
        const fast = nextCookie();
        peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: slow, offset: 0, length: 65536 });
        await hold.reached;
        peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: fast, offset: 512 * 1024, length: 4096 });
        // collect() rejects a reply for any other cookie: the held read cannot overtake.
        const first = await peer.collect([fast]);
        expect(decodeRead(first.byCookie.get(fast.toString('hex')) ?? [], 512 * 1024, 4096).error).toBe(0);
        hold.release();
        const second = await peer.collect([slow]);
        const decoded = decodeRead(second.byCookie.get(slow.toString('hex')) ?? [], 0, 65536);
        expect(decoded.problems).toEqual([]);
        expect(decoded.data?.equals(pattern(65536, 2))).toBe(true);
      }
    });

    it('fact 14: a big read then a small one: whatever the order, each reply carries its own cookie and data', async () => {
      const volume = catalog.volume('big');
      volume.fill(0, pattern(16 * MiB, 3));
      volume.fill(40 * MiB, pattern(8192, 4));
      for (const mode of modes) {
        const { peer } = await open('big', { structured: mode.structured });
        const big = nextCookie();
        const small = nextCookie();
        peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: big, offset: 0, length: 16 * MiB });
        peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: small, offset: 40 * MiB, length: 8192 });
        const { byCookie } = await peer.collect([big, small], { timeoutMs: 20_000 });
        const bigRead = decodeRead(byCookie.get(big.toString('hex')) ?? [], 0, 16 * MiB);
        const smallRead = decodeRead(byCookie.get(small.toString('hex')) ?? [], 40 * MiB, 8192);
        expect(bigRead.problems).toEqual([]);
        expect(smallRead.problems).toEqual([]);
        expect(bigRead.data?.equals(pattern(16 * MiB, 3))).toBe(true);
        expect(smallRead.data?.equals(pattern(8192, 4))).toBe(true);
      }
    });
  });

  describe('fact 15: simple replies', () => {
    it('fact 15: without structured replies a READ gets a simple reply with exactly length bytes (holes as zeros)', async () => {
      const { peer } = await open('data');
      const volume = catalog.volume('data');
      volume.fill(4096, pattern(6000, 5));
      for (const [offset, length] of [
        [0, 16384],
        [4096, 6000],
        [4095, 2],
        [100 * 1024, 4096],
        [MiB - 1, 1],
      ] as const) {
        const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset, length });
        expect(messages).toHaveLength(1);
        const reply = messages[0];
        expect(reply?.kind).toBe('simple');
        if (reply?.kind !== 'simple') return;
        expect(reply.error).toBe(0);
        expect(reply.data?.equals(volume.bytes(offset, length))).toBe(true);
      }
    });

    it('fact 15: a failed READ carries no payload, and the next reply is framed correctly', async () => {
      const { peer } = await open('data');
      catalog.volume('data').failNext('read', 'EIO');
      const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length: 65536 });
      expect(messages).toHaveLength(1);
      expect(messages[0]?.kind).toBe('simple');
      expect(replyError(messages)).toBe(Errno.NBD_EIO);
      await expectUsable(peer);
    });

    it('fact 15: every reply is simple when structured replies were not agreed', async () => {
      const { peer } = await open('data');
      const requests: Array<Omit<W.RequestFields, 'cookie'>> = [
        { type: Cmd.NBD_CMD_WRITE, offset: 0, payload: pattern(4096, 6) },
        { type: Cmd.NBD_CMD_WRITE, offset: MiB, payload: pattern(4096, 6) },
        { type: Cmd.NBD_CMD_FLUSH },
        { type: Cmd.NBD_CMD_TRIM, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_CACHE, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_READ, offset: MiB, length: 4096 },
        { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: 0, length: 4096 },
        { type: 0x55, offset: 0, length: 0 },
      ];
      for (const r of requests) {
        const messages = await peer.roundTrip({ ...r, cookie: nextCookie() });
        expect(messages).toHaveLength(1);
        expect(messages[0]?.kind, `command ${r.type}`).toBe('simple');
      }
    });
  });

  describe('fact 16: structured replies', () => {
    it('fact 16: a READ over data and holes gets well-formed chunks that cover the request exactly', async () => {
      const { peer } = await open('data', { structured: true });
      const volume = catalog.volume('data');
      volume.fill(0, pattern(8192, 7));
      volume.fill(20480, pattern(100, 8));
      volume.fill(65536, pattern(4096, 9));
      for (const [offset, length] of [
        [0, 131072],
        [1, 131070],
        [8192, 12288],
        [20000, 1000],
        [0, MiB],
      ] as const) {
        const result = await read(peer, offset, length);
        expect(result.error).toBe(0);
        expect(result.data?.equals(volume.bytes(offset, length))).toBe(true);
      }
    });

    it('fact 16 (issue 2): a READ of an unallocated range is answered with OFFSET_HOLE chunks, no data', async () => {
      const { peer } = await open('data', { structured: true });
      const result = await read(peer, 256 * 1024, 256 * 1024);
      expect(result.error).toBe(0);
      expect(result.holeChunks).toBeGreaterThan(0);
      expect(result.dataChunks).toBe(0);
      expect(result.data?.equals(Buffer.alloc(256 * 1024))).toBe(true);
    });

    it('fact 16: an early EINVAL to a READ is still a structured reply with a nonzero error chunk', async () => {
      const { peer } = await open('data', { structured: true });
      for (const [offset, length, flags] of [
        [MiB, 4096, 0],
        [MiB - 512, 4096, 0],
        [0, 4096, 1 << 9],
        [0, 4096, CmdFlag.NBD_CMD_FLAG_REQ_ONE],
      ] as const) {
        const result = await read(peer, offset, length, flags);
        expect(result.error, `read ${offset}+${length} flags ${flags}`).toBe(Errno.NBD_EINVAL);
        expect(result.errorChunks.length).toBeGreaterThan(0);
      }
      await expectUsable(peer);
    });

    it('fact 16: a storage error during a READ becomes a nonzero error chunk and DONE comes last', async () => {
      const { peer } = await open('data', { structured: true });
      catalog.volume('data').failNext('read', 'EIO');
      const result = await read(peer, 0, 65536);
      expect(result.error).toBe(Errno.NBD_EIO);
      await expectUsable(peer);
    });

    it('fact 16: replies to other commands on a structured connection are payload-free simple replies or well-formed chunks', async () => {
      const { peer } = await open('data', { structured: true, meta: true });
      const requests: Array<Omit<W.RequestFields, 'cookie'>> = [
        { type: Cmd.NBD_CMD_WRITE, offset: 0, payload: pattern(4096, 10) },
        { type: Cmd.NBD_CMD_WRITE, offset: MiB, payload: pattern(4096, 10) },
        { type: Cmd.NBD_CMD_FLUSH },
        { type: Cmd.NBD_CMD_TRIM, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_TRIM, offset: MiB, length: 4096 },
        { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_CACHE, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: MiB, length: 4096 },
        { type: 0x55, offset: 0, length: 0 },
      ];
      for (const r of requests) await command(peer, r);
      await expectUsable(peer);
    });
  });

  describe('fact 17: DF', () => {
    it('fact 17: SEND_DF is advertised only when structured replies were agreed', async () => {
      const simple = await open('data');
      expect(simple.export.flags & TxFlag.NBD_FLAG_SEND_DF).toBe(0);
      const structured = await open('data', { structured: true });
      expect(structured.export.flags & TxFlag.NBD_FLAG_SEND_DF).toBe(TxFlag.NBD_FLAG_SEND_DF);
    });

    it('fact 17: a DF read up to 64 KiB over data and holes gets exactly one content chunk', async () => {
      const { peer } = await open('data', { structured: true });
      const volume = catalog.volume('data');
      volume.fill(4096, pattern(4096, 11));
      volume.fill(40960, pattern(10, 12));
      for (const [offset, length] of [
        [0, 65536],
        [1, 65535],
        [128 * 1024, 65536],
        [4096, 4096],
      ] as const) {
        const result = await read(peer, offset, length, CmdFlag.NBD_CMD_FLAG_DF);
        expect(result.error, `DF read ${offset}+${length}`).toBe(0);
        expect(result.dataChunks + result.holeChunks).toBe(1);
        expect(result.data?.equals(volume.bytes(offset, length))).toBe(true);
      }
      // Mixed data and hole: the single chunk must be OFFSET_DATA with the zeros present.
      const mixed = await read(peer, 0, 65536, CmdFlag.NBD_CMD_FLAG_DF);
      expect(mixed.dataChunks).toBe(1);
      expect(mixed.holeChunks).toBe(0);
    });
  });

  describe('fact 18: FLUSH and FUA', () => {
    it('fact 18: every write answered before a FLUSH is durable when the FLUSH reply arrives', async () => {
      const { peer, export: exp } = await open('data', { structured: true });
      expect(exp.flags & TxFlag.NBD_FLAG_SEND_FLUSH).toBe(TxFlag.NBD_FLAG_SEND_FLUSH);
      const volume = catalog.volume('data');
      const first = pattern(8192, 13);
      const second = pattern(3000, 14);
      expect(await write(peer, 0, first)).toBe(0);
      expect(await write(peer, 100_000, second)).toBe(0);
      expect(await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 2048, length: 1024 })).toBe(0);
      expect(await command(peer, { type: Cmd.NBD_CMD_FLUSH })).toBe(0);
      const expected = Buffer.from(first);
      expected.fill(0, 2048, 3072);
      expect(volume.durableBytes(0, 8192).equals(expected)).toBe(true);
      expect(volume.durableBytes(100_000, 3000).equals(second)).toBe(true);
    });

    it('fact 18: a FUA write or zero is durable when its reply arrives', async () => {
      const { peer, export: exp } = await open('data');
      expect(exp.flags & TxFlag.NBD_FLAG_SEND_FUA).toBe(TxFlag.NBD_FLAG_SEND_FUA);
      const volume = catalog.volume('data');
      const data = pattern(5000, 15);
      expect(await write(peer, 12345, data, CmdFlag.NBD_CMD_FLAG_FUA)).toBe(0);
      expect(volume.durableBytes(12345, 5000).equals(data)).toBe(true);
      expect(await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, flags: CmdFlag.NBD_CMD_FLAG_FUA, offset: 12345, length: 100 })).toBe(0);
      expect(volume.durableBytes(12345, 100).equals(Buffer.alloc(100))).toBe(true);
    });

    it('fact 18: FUA is accepted on every command when SEND_FUA is offered', async () => {
      const { peer } = await open('data', { structured: true, meta: true });
      const fua = CmdFlag.NBD_CMD_FLAG_FUA;
      expect(await write(peer, 0, pattern(4096, 16), fua)).toBe(0);
      expect((await read(peer, 0, 4096, fua)).error).toBe(0);
      for (const r of [
        { type: Cmd.NBD_CMD_FLUSH },
        { type: Cmd.NBD_CMD_TRIM, offset: 8192, length: 4096 },
        { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 8192, length: 4096 },
        { type: Cmd.NBD_CMD_CACHE, offset: 0, length: 4096 },
        { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: 0, length: 4096 },
      ]) {
        expect(await command(peer, { ...r, flags: fua }), `FUA on command ${r.type}`).toBe(0);
      }
    });
  });

  it('fact 19: CAN_MULTI_CONN: a write on A, a FLUSH on B, then the data is durable and visible on C', async () => {
    const a = await open('data');
    const b = await open('data', { structured: true });
    expect(a.export.flags & TxFlag.NBD_FLAG_CAN_MULTI_CONN).toBe(TxFlag.NBD_FLAG_CAN_MULTI_CONN);
    const data = pattern(65536, 17);
    expect(await write(a.peer, 4096, data)).toBe(0);
    expect(await command(b.peer, { type: Cmd.NBD_CMD_FLUSH })).toBe(0);
    expect(catalog.volume('data').durableBytes(4096, 65536).equals(data)).toBe(true);
    const c = await open('data', { structured: true });
    expect((await read(c.peer, 4096, 65536)).data?.equals(data)).toBe(true);
    // A FUA write on B is visible on A (still open) by the time of its reply.
    const more = pattern(4096, 18);
    expect(await write(b.peer, 200_000, more, CmdFlag.NBD_CMD_FLAG_FUA)).toBe(0);
    expect((await read(a.peer, 200_000, 4096)).data?.equals(more)).toBe(true);
  });

  describe('fact 20: transmission flags', () => {
    it('fact 20: HAS_FLAGS is set, no unsupported or undefined flag is set, and what issue 2 requires is offered', async () => {
      for (const structured of [false, true]) {
        const { export: exp } = await open('data', { structured });
        const f = exp.flags;
        expect(f & TxFlag.NBD_FLAG_HAS_FLAGS).toBe(TxFlag.NBD_FLAG_HAS_FLAGS);
        expect(f & TxFlag.NBD_FLAG_READ_ONLY).toBe(0);
        // Experimental extensions clonebd does not implement, and bits the spec does not define.
        expect(f & (TxFlag.NBD_FLAG_SEND_RESIZE | TxFlag.NBD_FLAG_BLOCK_STATUS_PAYLOAD)).toBe(0);
        expect(f & 0xe000).toBe(0);
        for (const flag of [
          TxFlag.NBD_FLAG_SEND_FLUSH,
          TxFlag.NBD_FLAG_SEND_FUA,
          TxFlag.NBD_FLAG_SEND_TRIM,
          TxFlag.NBD_FLAG_SEND_WRITE_ZEROES,
          TxFlag.NBD_FLAG_SEND_FAST_ZERO,
          TxFlag.NBD_FLAG_CAN_MULTI_CONN,
          TxFlag.NBD_FLAG_SEND_CACHE,
        ]) {
          expect(f & flag, `flag ${flag}`).toBe(flag);
        }
      }
      const ro = await open('ro');
      expect(ro.export.flags & TxFlag.NBD_FLAG_READ_ONLY).toBe(TxFlag.NBD_FLAG_READ_ONLY);
      expect(ro.export.flags & TxFlag.NBD_FLAG_HAS_FLAGS).toBe(TxFlag.NBD_FLAG_HAS_FLAGS);
    });

    it('fact 20: writes, trims and zeroes on a READ_ONLY export fail with EPERM, change nothing, and the connection goes on', async () => {
      const volume = catalog.volume('ro');
      volume.fill(0, pattern(8192, 19));
      for (const structured of [false, true]) {
        const { peer } = await open('ro', { structured });
        expect(await write(peer, 0, pattern(4096, 20))).toBe(Errno.NBD_EPERM);
        expect(await write(peer, 0, pattern(4096, 20), CmdFlag.NBD_CMD_FLAG_FUA)).toBe(Errno.NBD_EPERM);
        expect(await command(peer, { type: Cmd.NBD_CMD_TRIM, offset: 0, length: 8192 })).toBe(Errno.NBD_EPERM);
        expect(await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 0, length: 8192 })).toBe(Errno.NBD_EPERM);
        expect(
          await command(peer, {
            type: Cmd.NBD_CMD_WRITE_ZEROES,
            flags: CmdFlag.NBD_CMD_FLAG_FAST_ZERO,
            offset: 0,
            length: 8192,
          }),
        ).not.toBe(0);
        expect(volume.bytes(0, 8192).equals(pattern(8192, 19))).toBe(true);
        await expectUsable(peer, 'ro');
      }
      expect(volume.countCalls('write') + volume.countCalls('trim') + volume.countCalls('zero')).toBe(0);
    });
  });

  describe('fact 21: WRITE_ZEROES', () => {
    it('fact 21: reads after WRITE_ZEROES return zeros, with and without NO_HOLE, aligned or not', async () => {
      const { peer } = await open('data', { structured: true });
      const volume = catalog.volume('data');
      for (const [offset, length, flags] of [
        [0, 65536, 0],
        [70000, 10000, 0],
        [131072, 65536, CmdFlag.NBD_CMD_FLAG_NO_HOLE],
        [200_001, 9_999, CmdFlag.NBD_CMD_FLAG_NO_HOLE],
      ] as const) {
        const data = pattern(length + 8192, offset);
        expect(await write(peer, offset - (offset >= 4096 ? 4096 : 0), data)).toBe(0);
        expect(await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, flags, offset, length })).toBe(0);
        const result = await read(peer, offset, length);
        expect(result.data?.equals(Buffer.alloc(length))).toBe(true);
        expect(volume.bytes(offset, length).equals(Buffer.alloc(length))).toBe(true);
      }
    });

    it('fact 21: NO_HOLE is honoured: storage is asked not to punch holes and the range reads back allocated', async () => {
      const { peer, contextIds } = await open('data', { meta: true });
      const volume = catalog.volume('data');
      expect(
        await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, flags: CmdFlag.NBD_CMD_FLAG_NO_HOLE, offset: 65536, length: 65536 }),
      ).toBe(0);
      const zeroCalls = volume.calls.filter((c) => c.op === 'zero');
      expect(zeroCalls.length).toBeGreaterThan(0);
      for (const call of zeroCalls) expect(call.mayTrim).toBe(false);
      const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_BLOCK_STATUS, cookie: nextCookie(), offset: 65536, length: 65536 });
      const chunk = messages.find((m) => m.kind === 'chunk' && m.type === ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS);
      if (chunk?.kind !== 'chunk') throw new Error('no BLOCK_STATUS chunk');
      const status = W.parseBlockStatus(chunk.payload);
      expect(status.contextId).toBe(contextIds.get('base:allocation'));
      expect((status.descriptors[0]?.flags ?? -1) & StateFlag.NBD_STATE_HOLE).toBe(0);
      expect(status.descriptors[0]?.length).toBeGreaterThanOrEqual(65536);
    });

    it('fact 21: FAST_ZERO either zeroes the range or fails with ENOTSUP leaving it unchanged; SEND_FAST_ZERO implies SEND_WRITE_ZEROES', async () => {
      const { peer, export: exp } = await open('data');
      if ((exp.flags & TxFlag.NBD_FLAG_SEND_FAST_ZERO) !== 0) {
        expect(exp.flags & TxFlag.NBD_FLAG_SEND_WRITE_ZEROES).toBe(TxFlag.NBD_FLAG_SEND_WRITE_ZEROES);
      }
      const volume = catalog.volume('data');
      const data = pattern(65536, 21);
      expect(await write(peer, 0, data)).toBe(0);
      for (const flags of [CmdFlag.NBD_CMD_FLAG_FAST_ZERO, CmdFlag.NBD_CMD_FLAG_FAST_ZERO | CmdFlag.NBD_CMD_FLAG_NO_HOLE]) {
        const error = await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, flags, offset: 0, length: 32768 });
        expect([0, Errno.NBD_ENOTSUP]).toContain(error);
        if (error === Errno.NBD_ENOTSUP) expect(volume.bytes(0, 32768).equals(data.subarray(0, 32768))).toBe(true);
        else expect(volume.bytes(0, 32768).equals(Buffer.alloc(32768))).toBe(true);
        expect(await write(peer, 0, data)).toBe(0);
      }
    });

    it('fact 21: a WRITE_ZEROES without FAST_ZERO never gets ENOTSUP, even when storage reports ENOTSUP', async () => {
      const { peer } = await open('data', { structured: true });
      const volume = catalog.volume('data');
      for (const flags of [0, CmdFlag.NBD_CMD_FLAG_NO_HOLE]) {
        volume.failNext('zero', 'ENOTSUP');
        const error = await command(peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, flags, offset: 0, length: 65536 });
        expect(error).not.toBe(Errno.NBD_ENOTSUP);
      }
      await expectUsable(peer);
    });
  });

  describe('fact 22: DISC', () => {
    it('fact 22: DISC with nothing in flight: no reply, the server closes the connection', async () => {
      for (const structured of [false, true]) {
        const { peer } = await open('data', { structured });
        disc(peer);
        expect((await peer.waitForClose()).length).toBe(0);
      }
    });

    it('fact 22: DISC finishes the requests still in flight, answers them, then closes', async () => {
      const { peer } = await open('data');
      const volume = catalog.volume('data');
      const holdWrite = volume.hold('write');
      const holdRead = volume.hold('read');
      const writeCookie = nextCookie();
      const readCookie = nextCookie();
      const data = pattern(8192, 22);
      volume.fill(MiB - 4096, pattern(4096, 23));
      peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie: writeCookie, offset: 0, payload: data });
      peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: readCookie, offset: MiB - 4096, length: 4096 });
      await Promise.all([holdWrite.reached, holdRead.reached]);
      disc(peer);
      holdWrite.release();
      holdRead.release();
      const { byCookie } = await peer.collect([writeCookie, readCookie]);
      expect(replyError(byCookie.get(writeCookie.toString('hex')) ?? [])).toBe(0);
      const r = decodeRead(byCookie.get(readCookie.toString('hex')) ?? [], MiB - 4096, 4096);
      expect(r.data?.equals(pattern(4096, 23))).toBe(true);
      expect((await peer.waitForClose()).length).toBe(0);
      expect(volume.bytes(0, 8192).equals(data)).toBe(true);
    });
  });

  describe('fact 23: CACHE', () => {
    it('fact 23: CACHE succeeds and reads afterwards are the same as without it', async () => {
      const { peer } = await open('data', { structured: true });
      const volume = catalog.volume('data');
      volume.fill(0, pattern(100_000, 24));
      const before = await read(peer, 0, 131072);
      expect(await command(peer, { type: Cmd.NBD_CMD_CACHE, offset: 0, length: 131072 })).toBe(0);
      const after = await read(peer, 0, 131072);
      expect(after.data?.equals(before.data ?? Buffer.alloc(0))).toBe(true);
      expect(after.data?.equals(volume.bytes(0, 131072))).toBe(true);
    });

    it('fact 23: CACHE with a flag the server does not know is turned away with EINVAL', async () => {
      const { peer } = await open('data', { structured: true });
      for (const flags of [1 << 6, 1 << 15, CmdFlag.NBD_CMD_FLAG_REQ_ONE, CmdFlag.NBD_CMD_FLAG_DF, CmdFlag.NBD_CMD_FLAG_NO_HOLE]) {
        expect(await command(peer, { type: Cmd.NBD_CMD_CACHE, flags, offset: 0, length: 4096 }), `flags ${flags}`).toBe(
          Errno.NBD_EINVAL,
        );
      }
      await expectUsable(peer);
    });
  });

  describe('fact 24: BLOCK_STATUS', () => {
    /** Layout: data [0, 8K), hole [8K, 20K), allocated zeros [20K, 24K), data [24K, 28K), hole to the end. */
    function layout(): void {
      const volume = catalog.volume('data');
      volume.fill(0, pattern(8192, 25));
      volume.allocateZeroBlock(5);
      volume.fill(24576, pattern(4096, 26));
    }

    async function status(
      t: Transmission,
      offset: number,
      length: number,
      flags = 0,
    ): Promise<{ messages: ReplyMessage[]; descriptors: W.StatusDescriptor[] }> {
      const messages = await t.peer.roundTrip({ type: Cmd.NBD_CMD_BLOCK_STATUS, flags, cookie: nextCookie(), offset, length });
      const chunks = messages.filter((m) => m.kind === 'chunk' && m.type === ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS);
      expect(chunks, 'exactly one BLOCK_STATUS chunk per selected context').toHaveLength(1);
      const chunk = chunks[0];
      if (chunk?.kind !== 'chunk') throw new Error('unreachable');
      const parsed = W.parseBlockStatus(chunk.payload);
      expect(parsed.contextId).toBe(t.contextIds.get('base:allocation'));
      expect(parsed.descriptors.length).toBeGreaterThan(0);
      for (const d of parsed.descriptors) expect(d.length).toBeGreaterThan(0);
      return { messages, descriptors: parsed.descriptors };
    }

    it('fact 24: one BLOCK_STATUS chunk per context, nonzero lengths, the first N−1 inside the request, holes reported', async () => {
      layout();
      const t = await open('data', { meta: true });
      const volume = catalog.volume('data');
      for (const [offset, length] of [
        [0, MiB],
        [0, 32768],
        [4096, 20000],
        [1000, 1],
        [MiB - 4096, 4096],
      ] as const) {
        const { descriptors } = await status(t, offset, length);
        const lengths = descriptors.map((d) => d.length);
        const firstNMinus1 = lengths.slice(0, -1).reduce((a, b) => a + b, 0);
        expect(firstNMinus1).toBeLessThan(length);
        // Every reported extent agrees with the volume: HOLE only on holes, ZERO only where zeros.
        let at = offset;
        for (const d of descriptors) {
          const end = Math.min(at + d.length, offset + length, volume.size);
          for (let block = Math.floor(at / 4096); block * 4096 < end; block++) {
            if ((d.flags & StateFlag.NBD_STATE_HOLE) !== 0) expect(volume.isAllocated(block), `block ${block}`).toBe(false);
            else expect(volume.isAllocated(block), `block ${block}`).toBe(true);
          }
          if ((d.flags & StateFlag.NBD_STATE_ZERO) !== 0) {
            expect(volume.bytes(at, end - at).equals(Buffer.alloc(end - at))).toBe(true);
          }
          at += d.length;
        }
      }
      // The whole-export query distinguishes data from holes.
      const { descriptors } = await status(t, 0, MiB);
      expect((descriptors[0]?.flags ?? -1) & StateFlag.NBD_STATE_HOLE).toBe(0);
      expect(descriptors.some((d) => (d.flags & StateFlag.NBD_STATE_HOLE) !== 0)).toBe(true);
    });

    it('fact 24: with REQ_ONE every chunk has exactly one descriptor, no longer than the request', async () => {
      layout();
      const t = await open('data', { meta: true });
      for (const [offset, length] of [
        [0, MiB],
        [0, 4096],
        [8192, 100],
        [9000, 500_000],
        [30_000, 1],
      ] as const) {
        const { descriptors } = await status(t, offset, length, CmdFlag.NBD_CMD_FLAG_REQ_ONE);
        expect(descriptors).toHaveLength(1);
        expect(descriptors[0]?.length).toBeLessThanOrEqual(length);
      }
    });

    it('fact 24: BLOCK_STATUS beyond the end gets EINVAL and the connection goes on', async () => {
      const t = await open('data', { meta: true });
      expect(await command(t.peer, { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: MiB, length: 4096 })).toBe(Errno.NBD_EINVAL);
      expect(await command(t.peer, { type: Cmd.NBD_CMD_BLOCK_STATUS, offset: MiB - 4096, length: 8192 })).toBe(Errno.NBD_EINVAL);
      await status(t, 0, 4096);
    });

    it('fact 24: a fragmented export never gets more than 2^20 descriptors in one chunk', async () => {
      const sector = 512;
      const blocks = 2 ** 20 + 4096;
      const spec: MemoryVolumeSpec = { name: 'frag', size: blocks * sector, blockSize: sector };
      await server.close();
      await startServer([spec]);
      const volume = catalog.volume('frag');
      for (let block = 0; block < blocks; block += 2) volume.allocateZeroBlock(block);
      const t = await open('frag', { meta: true });
      const { descriptors } = await status(t, 0, blocks * sector);
      expect(descriptors.length).toBeLessThanOrEqual(2 ** 20);
      expect(descriptors.slice(0, -1).reduce((a, d) => a + d.length, 0)).toBeLessThan(blocks * sector);
    }, 60_000);
  });

  it('fact 25: writes to extents reported without the HOLE bit never fail with ENOSPC', async () => {
    const t = await open('full', { meta: true });
    const volume = catalog.volume('full');
    // Capacity is 4 blocks: allocate them all.
    expect(await write(t.peer, 0, pattern(16384, 27))).toBe(0);
    // A write that needs a new block may fail with ENOSPC (and must not disconnect).
    expect([0, Errno.NBD_ENOSPC]).toContain(await write(t.peer, 65536, pattern(4096, 28)));
    const messages = await t.peer.roundTrip({ type: Cmd.NBD_CMD_BLOCK_STATUS, cookie: nextCookie(), offset: 0, length: MiB });
    const chunk = messages.find((m) => m.kind === 'chunk' && m.type === ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS);
    if (chunk?.kind !== 'chunk') throw new Error('no BLOCK_STATUS chunk');
    let at = 0;
    let checked = 0;
    for (const d of W.parseBlockStatus(chunk.payload).descriptors) {
      if ((d.flags & StateFlag.NBD_STATE_HOLE) === 0) {
        const length = Math.min(d.length, MiB - at);
        const error = await write(t.peer, at, pattern(length, 29));
        expect(error, `write to non-hole extent [${at}, +${length})`).not.toBe(Errno.NBD_ENOSPC);
        expect(error).toBe(0);
        checked += length;
      }
      at += d.length;
    }
    expect(checked).toBeGreaterThanOrEqual(16384);
    expect(volume.allocatedBlocks).toBeLessThanOrEqual(4);
  });
});

describe('transmission SHOULDs: errors, and the connection keeps working', () => {
  for (const mode of modes) {
    it(`SHOULD: out-of-range requests: WRITE/WRITE_ZEROES past the end ENOSPC, READ/TRIM/BLOCK_STATUS past the end EINVAL (${mode.label})`, async () => {
      const { peer } = await open('data', { structured: mode.structured, meta: mode.structured });
      const volume = catalog.volume('data');
      const cases: Array<[Omit<W.RequestFields, 'cookie'>, number]> = [
        [{ type: Cmd.NBD_CMD_WRITE, offset: MiB, payload: pattern(4096, 30) }, Errno.NBD_ENOSPC],
        [{ type: Cmd.NBD_CMD_WRITE, offset: MiB - 512, payload: pattern(4096, 30) }, Errno.NBD_ENOSPC],
        [{ type: Cmd.NBD_CMD_WRITE, offset: 2n ** 63n, payload: pattern(512, 30) }, Errno.NBD_ENOSPC],
        [{ type: Cmd.NBD_CMD_WRITE_ZEROES, offset: MiB - 512, length: 4096 }, Errno.NBD_ENOSPC],
        [{ type: Cmd.NBD_CMD_TRIM, offset: MiB - 512, length: 4096 }, Errno.NBD_EINVAL],
        [{ type: Cmd.NBD_CMD_TRIM, offset: 0xfffffffffffff000n, length: 8192 }, Errno.NBD_EINVAL],
        [{ type: Cmd.NBD_CMD_CACHE, offset: MiB, length: 4096 }, Errno.NBD_EINVAL],
      ];
      if (mode.structured) cases.push([{ type: Cmd.NBD_CMD_BLOCK_STATUS, offset: MiB + 1, length: 1 }, Errno.NBD_EINVAL]);
      for (const [request, expected] of cases) {
        expect(await command(peer, request), `command ${request.type} at ${request.offset}`).toBe(expected);
      }
      for (const [offset, length] of [
        [MiB, 4096],
        [MiB - 1, 2],
        [0xffffffffffffff00n, 512],
      ] as const) {
        const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset, length });
        const decoded = decodeRead(messages, Number(offset), length);
        expect(decoded.problems).toEqual([]);
        expect(decoded.error).toBe(Errno.NBD_EINVAL);
      }
      expect(volume.countCalls('write') + volume.countCalls('zero') + volume.countCalls('trim')).toBe(0);
      await expectUsable(peer);
    });
  }

  it('SHOULD: an export whose size is not a multiple of 512 serves its last bytes exactly and refuses one byte more', async () => {
    const t = await open('odd', { structured: true });
    const size = MiB + 123;
    expect(t.export.size).toBe(size);
    const tail = pattern(123, 31);
    expect(await write(t.peer, MiB, tail)).toBe(0);
    expect((await read(t.peer, MiB, 123)).data?.equals(tail)).toBe(true);
    expect((await read(t.peer, size - 1, 1)).data?.[0]).toBe(tail[122]);
    expect((await read(t.peer, MiB, 124)).error).toBe(Errno.NBD_EINVAL);
    expect(await write(t.peer, MiB, pattern(124, 31))).toBe(Errno.NBD_ENOSPC);
  });

  it('SHOULD: requests misaligned to the advertised minimum block size get EINVAL (a minimum of 1 allows any alignment)', async () => {
    const t = await open('data', { structured: true });
    const sizes = t.infos.find((i) => 'minimum' in i);
    const minimum = sizes !== undefined && 'minimum' in sizes ? sizes.minimum : 1;
    const data = pattern(3, 32);
    const error = await write(t.peer, 1, data);
    const result = await read(t.peer, 1, 3);
    if (minimum === 1) {
      expect(error).toBe(0);
      expect(result.data?.equals(data)).toBe(true);
    } else {
      expect(error).toBe(Errno.NBD_EINVAL);
      expect(result.error).toBe(Errno.NBD_EINVAL);
    }
    await expectUsable(t.peer);
  });

  for (const mode of modes) {
    it(`SHOULD: an unknown command or a flag not defined for the command gets EINVAL (${mode.label})`, async () => {
      const { peer } = await open('data', { structured: mode.structured });
      for (const type of [Cmd.NBD_CMD_RESIZE, 9, 0x55, 0xffff]) {
        expect(await command(peer, { type, offset: 0, length: 4096 }), `command ${type}`).toBe(Errno.NBD_EINVAL);
      }
      const volume = catalog.volume('data');
      const before = volume.bytes(0, 8192);
      // A WRITE with a bad flag: refused, and its payload consumed so the stream stays framed.
      for (const flags of [CmdFlag.NBD_CMD_FLAG_DF, CmdFlag.NBD_CMD_FLAG_REQ_ONE, 1 << 7, 1 << 15, CmdFlag.NBD_CMD_FLAG_PAYLOAD_LEN]) {
        expect(await write(peer, 0, pattern(8192, 33), flags), `WRITE flags ${flags}`).toBe(Errno.NBD_EINVAL);
      }
      expect(volume.bytes(0, 8192).equals(before)).toBe(true);
      for (const [type, flags] of [
        [Cmd.NBD_CMD_TRIM, CmdFlag.NBD_CMD_FLAG_NO_HOLE],
        [Cmd.NBD_CMD_TRIM, CmdFlag.NBD_CMD_FLAG_FAST_ZERO],
        [Cmd.NBD_CMD_FLUSH, CmdFlag.NBD_CMD_FLAG_DF],
        [Cmd.NBD_CMD_WRITE_ZEROES, CmdFlag.NBD_CMD_FLAG_DF],
        [Cmd.NBD_CMD_WRITE_ZEROES, 1 << 8],
      ] as const) {
        const request = type === Cmd.NBD_CMD_FLUSH ? { type, flags } : { type, flags, offset: 0, length: 4096 };
        expect(await command(peer, request), `command ${type} flags ${flags}`).toBe(Errno.NBD_EINVAL);
      }
      const readFlags = mode.structured ? [CmdFlag.NBD_CMD_FLAG_REQ_ONE, 1 << 12] : [CmdFlag.NBD_CMD_FLAG_DF, 1 << 12];
      for (const flags of readFlags) {
        const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, flags, cookie: nextCookie(), offset: 0, length: 4096 });
        expect(decodeRead(messages, 0, 4096).error, `READ flags ${flags}`).toBe(Errno.NBD_EINVAL);
      }
      await expectUsable(peer);
    });
  }

  it('SHOULD: a 32 MiB WRITE and READ (the default maximum payload) are served without disconnecting', async () => {
    for (const mode of modes) {
      const { peer } = await open('big', { structured: mode.structured });
      const data = pattern(W.MAX_DEFAULT_PAYLOAD, 34);
      expect(await write(peer, 4096, data)).toBe(0);
      const messages = await peer.roundTrip(
        { type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 4096, length: W.MAX_DEFAULT_PAYLOAD },
        20_000,
      );
      const decoded = decodeRead(messages, 4096, W.MAX_DEFAULT_PAYLOAD);
      expect(decoded.problems).toEqual([]);
      expect(decoded.data?.equals(data)).toBe(true);
      // A 32 MiB write past the end of a 1 MiB export: refused, but the connection stays up.
      const small = await open('data', { structured: mode.structured });
      expect(await write(small.peer, 0, data)).toBe(Errno.NBD_ENOSPC);
      await expectUsable(small.peer);
    }
  }, 60_000);

  it('SHOULD: a READ over 32 MiB gets EOVERFLOW or EINVAL with no payload, and the connection goes on', async () => {
    for (const mode of modes) {
      const { peer } = await open('big', { structured: mode.structured });
      const length = W.MAX_DEFAULT_PAYLOAD + 4096;
      const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length });
      const decoded = decodeRead(messages, 0, length);
      expect(decoded.problems).toEqual([]);
      expect([Errno.NBD_EOVERFLOW, Errno.NBD_EINVAL]).toContain(decoded.error);
      expect(decoded.dataChunks + decoded.holeChunks).toBe(0);
      await expectUsable(peer, 'big');
    }
  });

  it('SHOULD: a WRITE over 32 MiB is refused (EOVERFLOW/EINVAL with the payload consumed) or the connection is closed', async () => {
    const { peer } = await open('big');
    const volume = catalog.volume('big');
    const length = W.MAX_DEFAULT_PAYLOAD + 4096;
    const cookie = nextCookie();
    peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie, offset: 0, payload: pattern(length, 35) });
    const after = nextCookie();
    peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: after, offset: 0, length: 4096 });
    try {
      const { byCookie } = await peer.collect([cookie, after], { timeoutMs: 20_000 });
      expect([Errno.NBD_EOVERFLOW, Errno.NBD_EINVAL]).toContain(replyError(byCookie.get(cookie.toString('hex')) ?? []));
      expect(decodeRead(byCookie.get(after.toString('hex')) ?? [], 0, 4096).error).toBe(0);
    } catch (error) {
      // Closing is allowed for a payload the server deems too large; it must then be closed for good.
      expect(peer.closed, String(error)).toBe(true);
    }
    expect(volume.countCalls('write')).toBe(0);
  }, 60_000);

  it('SHOULD: TRIM and WRITE_ZEROES bigger than the maximum payload (about 4 GiB, as the kernel sends) are accepted', async () => {
    const t = await open('huge', { meta: true });
    const volume = catalog.volume('huge');
    volume.fill(GiB, pattern(8192, 36));
    volume.fill(3 * GiB, pattern(8192, 37));
    const length = 2 ** 32 - 4096;
    expect(await command(t.peer, { type: Cmd.NBD_CMD_TRIM, offset: 0, length })).toBe(0);
    expect(await command(t.peer, { type: Cmd.NBD_CMD_WRITE_ZEROES, offset: 0, length })).toBe(0);
    const result = await read(t.peer, GiB, 8192);
    expect(result.data?.equals(Buffer.alloc(8192))).toBe(true);
    expect((await read(t.peer, 3 * GiB, 8192)).data?.equals(Buffer.alloc(8192))).toBe(true);
  }, 60_000);

  it('SHOULD: zero-length READ, WRITE, TRIM and WRITE_ZEROES do not disconnect', async () => {
    for (const mode of modes) {
      const { peer } = await open('data', { structured: mode.structured });
      for (const type of [Cmd.NBD_CMD_READ, Cmd.NBD_CMD_WRITE, Cmd.NBD_CMD_TRIM, Cmd.NBD_CMD_WRITE_ZEROES, Cmd.NBD_CMD_CACHE]) {
        const messages = await peer.roundTrip({ type, cookie: nextCookie(), offset: 4096, length: 0 });
        expect(messages.length).toBeGreaterThan(0);
      }
      await expectUsable(peer);
    }
  });

  it('SHOULD: while shutting down, in-flight requests finish and later ones get ESHUTDOWN (or are never read), then the server closes', async () => {
    const { peer } = await open('data');
    const volume = catalog.volume('data');
    const hold = volume.hold('write');
    const writeCookie = nextCookie();
    const data = pattern(4096, 38);
    peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie: writeCookie, offset: 0, payload: data });
    await hold.reached;
    const closing = server.close();
    serverClosed = true;
    const lateCookie = nextCookie();
    peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: lateCookie, offset: 0, length: 4096 });
    hold.release();
    const first = await peer.readReplyMessage();
    expect(first.cookie.equals(writeCookie)).toBe(true);
    expect(first.kind === 'simple' ? first.error : -1).toBe(0);
    const rest = await peer.waitForClose(10_000);
    if (rest.length > 0) {
      const late = W.parseSimpleReplyHeader(rest);
      expect(late.cookie.equals(lateCookie)).toBe(true);
      expect(late.error).toBe(Errno.NBD_ESHUTDOWN);
      expect(rest.length).toBe(W.SIMPLE_REPLY_HEADER_LENGTH);
    }
    await within(closing, 10_000, 'server.close() after the client closed');
    expect(volume.durableBytes(0, 4096).equals(data)).toBe(true);
  });

  it('SHOULD: graceful shutdown with idle clients connected (one in transmission, one mid-handshake) completes and closes them', async () => {
    const idle = await open('data');
    const negotiating = await RawPeer.connect(target);
    peers.push(negotiating);
    await negotiating.startHandshake();
    const closing = server.close();
    serverClosed = true;
    expect((await idle.peer.waitForClose(10_000)).length).toBe(0);
    await negotiating.waitForClose(10_000);
    await within(closing, 10_000, 'server.close() with idle clients');
  });
});
