/**
 * The Linux kernel's view of the protocol, replayed byte for byte against a real `clonebd serve`:
 * nbd-client negotiates fixed newstyle with NBD_OPT_GO and no info requests and no structured
 * replies, then the kernel sends 512-byte-aligned READ/WRITE (FUA), FLUSH, TRIM of up to
 * 4 GiB − 512 in one request, WRITE_ZEROES (NO_HOLE), up to 128 requests at once with cookies
 * `(cmd_cookie << 32) | tag`, and NBD_CMD_DISC to detach.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { RawPeer, openTransmission, replyError, type PeerTarget, type ReplyMessage, type Transmission } from '../helpers/raw-peer.js';
import { startServerProcess, stopAllServerProcesses, type ServerProcess } from '../helpers/server-process.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Info, Cmd, CmdFlag, TxFlag } = W;

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const VOLUME = 'kernel';
const VOLUME_SIZE = 5 * GiB;
/** The largest discard the kernel puts in one request: a u32 byte count in whole 512-byte sectors. */
const KERNEL_MAX_DISCARD = 2 ** 32 - 512;
/** blk-mq tags the kernel's nbd driver gives one connection. */
const KERNEL_QUEUE_DEPTH = 128;

let server: ServerProcess;
let target: PeerTarget;
const peers: RawPeer[] = [];

beforeAll(async () => {
  server = await startServerProcess({ prepare: (pool) => pool.createVolume(VOLUME, VOLUME_SIZE) });
  target = { host: '127.0.0.1', port: server.port };
});

afterEach(() => {
  for (const peer of peers.splice(0)) peer.destroy();
});

afterAll(async () => {
  await stopAllServerProcesses();
});

/** The kernel's cookie: a per-command counter in the high half, the blk-mq tag in the low half. */
function kernelCookie(commandCookie: number, tag: number): Buffer {
  return Buffer.concat([W.u32(commandCookie), W.u32(tag)]);
}

let commandCookie = 0x80ff0001;
function nextCookie(tag = 0): Buffer {
  commandCookie = (commandCookie + 0x01010101) >>> 0;
  return kernelCookie(commandCookie, tag);
}

async function kernelConnection(): Promise<Transmission> {
  const opened = await openTransmission(target, { exportName: VOLUME });
  peers.push(opened.peer);
  return opened;
}

function pattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  for (let index = 0; index < length; index++) out[index] = (index * 31 + seed * 7 + (index >> 9)) & 0xff;
  return out;
}

function onlySimple(messages: readonly ReplyMessage[]): Extract<ReplyMessage, { kind: 'simple' }> {
  expect(messages).toHaveLength(1);
  const [reply] = messages;
  if (reply?.kind !== 'simple') throw new Error(`expected a simple reply, got ${JSON.stringify(reply)}`);
  return reply;
}

async function write(peer: RawPeer, offset: number, data: Buffer, flags = 0): Promise<void> {
  const reply = onlySimple(await peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, flags, cookie: nextCookie(), offset, payload: data }));
  expect(reply.error).toBe(0);
}

async function read(peer: RawPeer, offset: number, length: number): Promise<Buffer> {
  const reply = onlySimple(await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset, length }));
  expect(reply.error).toBe(0);
  expect(reply.magic).toBe(W.NBD_SIMPLE_REPLY_MAGIC);
  return reply.data!;
}

describe('the kernel client against a real server', () => {
  it('negotiates fixed newstyle and NBD_OPT_GO with no info requests: INFO_EXPORT, then ACK, no block sizes required', async () => {
    const peer = await RawPeer.connect(target);
    peers.push(peer);
    const greeting = await peer.startHandshake(W.ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | W.ClientFlag.NBD_FLAG_C_NO_ZEROES);
    expect(greeting.nbdMagic).toBe(W.NBDMAGIC);
    expect(greeting.ihaveopt).toBe(W.IHAVEOPT);
    expect(greeting.handshakeFlags & W.HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE).not.toBe(0);

    const replies = await peer.option(Opt.NBD_OPT_GO, W.goData(VOLUME, []));
    expect(replies.every((reply) => reply.option === Opt.NBD_OPT_GO)).toBe(true);
    expect(replies.map((reply) => reply.type)).not.toContain(Rep.NBD_REP_ERR_BLOCK_SIZE_REQD);
    expect(replies.at(-1)?.type).toBe(Rep.NBD_REP_ACK);
    expect(replies.at(-1)?.data.length).toBe(0);
    const infos = replies.filter((reply) => reply.type === Rep.NBD_REP_INFO).map((reply) => W.parseInfo(reply.data));
    const exportInfo = infos.find((info) => info.type === Info.NBD_INFO_EXPORT);
    expect(exportInfo).toMatchObject({ length: 12, size: BigInt(VOLUME_SIZE) });
    const flags = (exportInfo as { transmissionFlags: number }).transmissionFlags;
    for (const flag of [
      TxFlag.NBD_FLAG_HAS_FLAGS,
      TxFlag.NBD_FLAG_SEND_FLUSH,
      TxFlag.NBD_FLAG_SEND_FUA,
      TxFlag.NBD_FLAG_SEND_TRIM,
      TxFlag.NBD_FLAG_SEND_WRITE_ZEROES,
    ]) {
      expect(flags & flag, `transmission flag 0x${flag.toString(16)}`).toBe(flag);
    }
    expect(flags & TxFlag.NBD_FLAG_READ_ONLY).toBe(0);

    // Transmission started right after the ACK: a request gets a simple reply, not option bytes.
    const cookie = nextCookie(3);
    const reply = onlySimple(await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie, offset: 0, length: 512 }));
    expect(reply.error).toBe(0);
    expect(reply.cookie).toEqual(cookie);
    expect(reply.data).toHaveLength(512);
  });

  it('answers 512-byte-aligned READ and WRITE (with and without FUA) with simple replies, and FLUSH', async () => {
    const { peer } = await kernelConnection();
    const base = 3 * GiB + 5 * 512;
    const block = pattern(4 * KiB, 1);
    await write(peer, 3 * GiB, block);
    // One sector in the middle of a 4 KiB block, then one with FUA across a block boundary.
    const sector = pattern(512, 2);
    await write(peer, base, sector);
    const straddle = pattern(1024, 3);
    await write(peer, 3 * GiB + 4 * KiB - 512, straddle, CmdFlag.NBD_CMD_FLAG_FUA);
    const flush = onlySimple(await peer.roundTrip({ type: Cmd.NBD_CMD_FLUSH, cookie: nextCookie() }));
    expect(flush.error).toBe(0);

    const expected = Buffer.concat([block, Buffer.alloc(512)]);
    sector.copy(expected, 5 * 512);
    straddle.copy(expected, 4 * KiB - 512);
    expect((await read(peer, 3 * GiB, 4 * KiB + 512)).equals(expected)).toBe(true);
    expect((await read(peer, base, 512)).equals(sector)).toBe(true);
  });

  it('accepts a TRIM of 4 GiB − 512 in one request, zeroing what it covers and nothing else', async () => {
    const { peer } = await kernelConnection();
    const inside = pattern(4 * KiB, 4);
    const outside = pattern(4 * KiB, 5);
    await write(peer, GiB, inside);
    await write(peer, 4 * GiB, outside);
    await write(peer, 0, pattern(512, 6));

    const reply = onlySimple(
      await peer.roundTrip({ type: Cmd.NBD_CMD_TRIM, cookie: nextCookie(), offset: 512, length: KERNEL_MAX_DISCARD }, 30_000),
    );
    expect(reply.error).toBe(0);
    expect((await read(peer, GiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB))).toBe(true);
    expect((await read(peer, 4 * GiB, 4 * KiB)).equals(outside)).toBe(true);
    expect((await read(peer, 0, 512)).equals(pattern(512, 6))).toBe(true);
  });

  it('accepts WRITE_ZEROES with NO_HOLE (and FUA), 4 GiB − 512 in one request, reading back zeros', async () => {
    const { peer } = await kernelConnection();
    const inside = pattern(8 * KiB, 7);
    await write(peer, 2 * GiB + 512, inside);
    await write(peer, 4 * GiB + 512, pattern(512, 8));

    const small = onlySimple(
      await peer.roundTrip({
        type: Cmd.NBD_CMD_WRITE_ZEROES,
        flags: CmdFlag.NBD_CMD_FLAG_NO_HOLE | CmdFlag.NBD_CMD_FLAG_FUA,
        cookie: nextCookie(),
        offset: 2 * GiB + 1024,
        length: 2048,
      }),
    );
    expect(small.error).toBe(0);
    const afterSmall = Buffer.from(inside);
    afterSmall.fill(0, 512, 2560);
    expect((await read(peer, 2 * GiB + 512, 8 * KiB)).equals(afterSmall)).toBe(true);

    const large = onlySimple(
      await peer.roundTrip(
        {
          type: Cmd.NBD_CMD_WRITE_ZEROES,
          flags: CmdFlag.NBD_CMD_FLAG_NO_HOLE,
          cookie: nextCookie(),
          offset: 512,
          length: KERNEL_MAX_DISCARD,
        },
        30_000,
      ),
    );
    expect(large.error).toBe(0);
    expect((await read(peer, 2 * GiB + 512, 8 * KiB)).equals(Buffer.alloc(8 * KiB))).toBe(true);
    expect((await read(peer, 4 * GiB + 512, 512)).equals(pattern(512, 8))).toBe(true);
  });

  it(`takes ${KERNEL_QUEUE_DEPTH} requests in flight at once and echoes every cookie byte for byte`, async () => {
    const { peer } = await kernelConnection();
    const area = 1 * GiB + 256 * MiB;
    const sources = Array.from({ length: KERNEL_QUEUE_DEPTH / 2 }, (_, index) => pattern(4 * KiB, 100 + index));
    for (const [index, data] of sources.entries()) await write(peer, area + index * 8 * KiB, data);

    const writes = Array.from({ length: KERNEL_QUEUE_DEPTH / 2 }, (_, index) => pattern(4 * KiB, 300 + index));
    const cookies: Buffer[] = [];
    const reads = new Map<string, number>();
    for (let tag = 0; tag < KERNEL_QUEUE_DEPTH; tag++) {
      // Odd bytes everywhere: high bits set, bytes that differ only in one half, a zero byte.
      const cookie = kernelCookie((0xfe00ff01 ^ (tag * 0x01010101)) >>> 0, (0x80000000 | (tag << 8) | 0x7f) >>> 0);
      cookies.push(cookie);
      const index = tag >> 1;
      if (tag % 2 === 0) {
        reads.set(cookie.toString('hex'), index);
        peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie, offset: area + index * 8 * KiB, length: 4 * KiB });
      } else {
        const flags = index % 4 === 0 ? CmdFlag.NBD_CMD_FLAG_FUA : 0;
        peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, flags, cookie, offset: area + index * 8 * KiB + 4 * KiB, payload: writes[index]! });
      }
    }
    expect(new Set(cookies.map((cookie) => cookie.toString('hex'))).size).toBe(KERNEL_QUEUE_DEPTH);

    const { byCookie, completionOrder } = await peer.collect(cookies, { timeoutMs: 30_000 });
    expect(completionOrder).toHaveLength(KERNEL_QUEUE_DEPTH);
    for (const cookie of cookies) {
      const reply = onlySimple(byCookie.get(cookie.toString('hex')) ?? []);
      expect(reply.cookie.equals(cookie), `cookie ${cookie.toString('hex')} echoed as ${reply.cookie.toString('hex')}`).toBe(true);
      expect(reply.error).toBe(0);
      const index = reads.get(cookie.toString('hex'));
      if (index !== undefined) expect(reply.data?.equals(sources[index]!), `read ${index}`).toBe(true);
    }
    for (const [index, data] of writes.entries()) {
      expect((await read(peer, area + index * 8 * KiB + 4 * KiB, 4 * KiB)).equals(data), `write ${index}`).toBe(true);
    }
  });

  it('closes the connection after NBD_CMD_DISC, once the replies to the requests before it were sent', async () => {
    const { peer } = await kernelConnection();
    const area = 2 * GiB + 512 * MiB;
    const cookies: Buffer[] = [];
    for (let index = 0; index < 8; index++) {
      const cookie = nextCookie(index);
      cookies.push(cookie);
      peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie, offset: area + index * 4 * KiB, payload: pattern(4 * KiB, 500 + index) });
    }
    const readCookie = nextCookie(8);
    cookies.push(readCookie);
    peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: readCookie, offset: area, length: 4 * KiB });
    // The kernel sends DISC without waiting for what is in flight.
    peer.sendRequest({ type: Cmd.NBD_CMD_DISC, cookie: nextCookie(9) });

    const { byCookie } = await peer.collect(cookies, { timeoutMs: 15_000 });
    for (const cookie of cookies) expect(replyError(byCookie.get(cookie.toString('hex')) ?? [])).toBe(0);
    const readReply = onlySimple(byCookie.get(readCookie.toString('hex')) ?? []);
    expect(readReply.data?.length).toBe(4 * KiB);
    const trailing = await peer.waitForClose(15_000);
    expect(trailing.length, 'bytes after the last reply (DISC gets none)').toBe(0);
  });
});
