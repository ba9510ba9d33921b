/**
 * Hostile and broken peers: garbage in and around the handshake, bad request magic, oversized
 * payloads, requests cut short by a disconnect, clients that stop reading. For each, the server
 * answers per the spec or closes that one connection; it never crashes (an exception in the
 * in-process server would fail this file), storage never sees a half-received write, and a fresh
 * connection still works afterwards.
 */
import fc from 'fast-check';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/server/index.js';
import { MemoryCatalog, MiB, protocolTestExports } from '../helpers/memory-catalog.js';
import {
  PeerClosedError,
  RawPeer,
  decodeRead,
  openTransmission,
  replyError,
  within,
  type PeerTarget,
  type Transmission,
} from '../helpers/raw-peer.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Cmd, Errno } = W;

let catalog: MemoryCatalog;
let server: NbdServer;
let serverClosed = false;
let target: PeerTarget;
const peers: RawPeer[] = [];

beforeEach(async () => {
  catalog = new MemoryCatalog(protocolTestExports());
  server = new NbdServer({ catalog, logger: pino({ level: 'silent' }) });
  serverClosed = false;
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  if (typeof address === 'string') throw new Error('expected a TCP address');
  target = { host: '127.0.0.1', port: address.port };
});

afterEach(async () => {
  for (const peer of peers.splice(0)) peer.destroy();
  catalog.releaseAll();
  if (!serverClosed) await within(server.close(), 20_000, 'server.close() in cleanup');
});

async function connect(): Promise<RawPeer> {
  const peer = await RawPeer.connect(target);
  peers.push(peer);
  return peer;
}

async function open(exportName: string, structured = false): Promise<Transmission> {
  const t = await openTransmission(target, { exportName, structured });
  peers.push(t.peer);
  return t;
}

let cookieCounter = 0x4800000000000000n;
function nextCookie(): Buffer {
  cookieCounter += 1n;
  return W.cookie(cookieCounter);
}

function junk(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** A fresh connection negotiates, writes, reads back and disconnects cleanly. */
async function expectHealthy(): Promise<void> {
  for (const structured of [false, true]) {
    const { peer } = await open('data', structured);
    const data = junk(4096, structured ? 7 : 8);
    const offset = 512 * 1024;
    const cookie = nextCookie();
    expect(replyError(await peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, cookie, offset, payload: data }))).toBe(0);
    const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset, length: 4096 });
    const decoded = decodeRead(messages, offset, 4096);
    expect(decoded.problems).toEqual([]);
    expect(decoded.data?.equals(data)).toBe(true);
    peer.sendRequest({ type: Cmd.NBD_CMD_DISC, cookie: nextCookie() });
    expect((await peer.waitForClose()).length).toBe(0);
  }
}

/** Waits until no handle of any volume is open any more (every session let go of its export). */
async function expectHandlesReleased(): Promise<void> {
  for (const volume of catalog.volumes()) {
    await within(volume.waitFor(() => volume.openHandles === 0), 10_000, `handles of ${volume.name} released`);
  }
}

describe('hostile peers in the handshake', () => {
  it('hostile: garbage sent before the greeting is read: the server closes the connection', async () => {
    for (const seed of [1, 2, 3]) {
      const peer = await connect();
      // Flags 0xff.. have unknown bits whatever the server offered.
      await peer.sendAndFlush(Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0xff]), junk(4096, seed)]));
      const rest = await peer.waitForClose();
      // At most the greeting came back; never an option reply to the garbage.
      expect(rest.length).toBeLessThanOrEqual(W.GREETING_LENGTH);
    }
    await expectHealthy();
  });

  it('hostile: garbage where an option header belongs (bad IHAVEOPT): the server closes the connection', async () => {
    for (const seed of [4, 5]) {
      const peer = await connect();
      await peer.startHandshake();
      peer.send(junk(1024, seed));
      expect((await peer.waitForClose()).length).toBe(0);
    }
    await expectHealthy();
  });

  it('hostile: garbage after a valid option: the valid one is answered, then the connection is closed', async () => {
    const peer = await connect();
    await peer.startHandshake();
    const replies = await peer.option(Opt.NBD_OPT_LIST);
    expect(replies[replies.length - 1]?.type).toBe(Rep.NBD_REP_ACK);
    peer.send(Buffer.concat([Buffer.from('IHAVEOPX'), junk(100, 6)]));
    expect((await peer.waitForClose()).length).toBe(0);
    await expectHealthy();
  });

  it('hostile: option data over the cap is refused with an error (data skipped) or the connection is closed, never buffered into an ACK', async () => {
    for (const size of [64 * 1024 + 1, 256 * 1024, 4 * MiB]) {
      for (const opt of [Opt.NBD_OPT_GO, 0x00abcdef, Opt.NBD_OPT_SET_META_CONTEXT]) {
        const peer = await connect();
        await peer.startHandshake();
        // A syntactically plausible GO whose name fills the data.
        const data = Buffer.concat([W.u32(size - 6), Buffer.alloc(size - 6, 0x61), W.u16(0)]);
        peer.sendOption(opt, data);
        try {
          const replies = await peer.readOptionReplies(10_000);
          const last = replies[replies.length - 1];
          expect(W.isErrorReplyType(last?.type ?? 0), `option ${opt} with ${size} bytes`).toBe(true);
          expect([Rep.NBD_REP_ERR_TOO_BIG, Rep.NBD_REP_ERR_INVALID, Rep.NBD_REP_ERR_UNSUP, Rep.NBD_REP_ERR_UNKNOWN]).toContain(
            last?.type,
          );
          // The data was skipped: the next option is parsed normally.
          const list = await peer.option(Opt.NBD_OPT_LIST);
          expect(list[list.length - 1]?.type).toBe(Rep.NBD_REP_ACK);
        } catch (error) {
          if (!(error instanceof PeerClosedError)) throw error;
        }
        peer.destroy();
      }
    }
    await expectHealthy();
  }, 60_000);

  it('hostile: an option announcing 512 MiB of data is refused (error reply, data skipped) or closed, and its data is not buffered', async () => {
    const peer = await connect();
    await peer.startHandshake();
    const declared = 512 * MiB;
    peer.sendOption(Opt.NBD_OPT_GO, Buffer.alloc(0), declared);
    const baseline = process.memoryUsage().arrayBuffers;
    let peak = 0;
    const chunk = junk(MiB, 9);
    for (let sent = 0; sent < declared && !peer.closed; sent += MiB) {
      await peer.sendAndFlush(chunk);
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - baseline);
    }
    // Buffering the option would hold 512 MiB.
    expect(peak).toBeLessThan(256 * MiB);
    try {
      const reply = await peer.readOptionReply(10_000);
      expect(reply.option).toBe(Opt.NBD_OPT_GO);
      expect([Rep.NBD_REP_ERR_TOO_BIG, Rep.NBD_REP_ERR_INVALID]).toContain(reply.type);
      const list = await peer.option(Opt.NBD_OPT_LIST);
      expect(list[list.length - 1]?.type).toBe(Rep.NBD_REP_ACK);
    } catch (error) {
      if (!(error instanceof PeerClosedError)) throw error;
    }
    peer.destroy();
    await expectHealthy();
  }, 60_000);

  it('hostile: a client that disappears after half an option header, or right after the greeting, does no harm', async () => {
    for (let i = 0; i < 10; i++) {
      const peer = await connect();
      if (i % 2 === 0) {
        await peer.startHandshake();
        await peer.sendAndFlush(W.option(Opt.NBD_OPT_GO, W.goData('data')).subarray(0, 11 + i));
      } else {
        await peer.readGreeting();
      }
      peer.destroy();
    }
    // Many clients parked mid-handshake at once do not block anyone else.
    const parked = await Promise.all(Array.from({ length: 50 }, () => connect()));
    await expectHealthy();
    for (const peer of parked) peer.destroy();
    await expectHandlesReleased();
  });

  it('hostile (fast-check): random bytes in place of the client handshake never crash the server', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 0, maxLength: 600 }), fc.boolean(), async (bytes, greetFirst) => {
        const peer = await connect();
        try {
          if (greetFirst) await peer.startHandshake();
          await peer.sendAndFlush(bytes);
          peer.end();
          // After our EOF the server must let go of the connection, answered or not.
          await peer.waitForClose(5_000);
        } finally {
          peer.destroy();
        }
      }),
      { numRuns: 40 },
    );
    await expectHealthy();
    await expectHandlesReleased();
  }, 60_000);
});

describe('hostile peers in transmission', () => {
  it('hostile: a request with a bad magic makes the server close that connection (after answering earlier requests)', async () => {
    for (const magic of [0x25609514, 0x12560953, 0x00000000, W.NBD_SIMPLE_REPLY_MAGIC, 0x21e41c71]) {
      const { peer } = await open('data');
      const good = nextCookie();
      const replies = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: good, offset: 0, length: 512 });
      expect(replyError(replies)).toBe(0);
      peer.send(W.request({ magic, type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length: 512 }));
      expect((await peer.waitForClose()).length, `magic 0x${magic.toString(16)}`).toBe(0);
    }
    await expectHealthy();
    await expectHandlesReleased();
  });

  it('hostile: an oversized WRITE header (2 GiB, 4 GiB) is refused or the connection closed; storage sees nothing', async () => {
    const volume = catalog.volume('big');
    for (const length of [0x80000000, 0xffffffff]) {
      const { peer } = await open('big');
      const cookie = nextCookie();
      peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie, offset: 0, length });
      // Stream part of the announced payload, as a client that means it would.
      const chunk = junk(MiB, 10);
      for (let sent = 0; sent < 48 * MiB && !peer.closed; sent += MiB) await peer.sendAndFlush(chunk);
      // Whatever came back before we give up must be an error reply for that cookie.
      if (!peer.closed && peer.bufferedBytes > 0) {
        const reply = await peer.readReplyMessage();
        expect(reply.cookie.equals(cookie)).toBe(true);
        expect(replyError([reply])).not.toBe(0);
      }
      peer.destroy();
    }
    expect(volume.countCalls('write')).toBe(0);
    await expectHealthy();
    await expectHandlesReleased();
  }, 60_000);

  it('hostile: a read past the end gets EINVAL and the connection keeps working', async () => {
    for (const structured of [false, true]) {
      const { peer } = await open('data', structured);
      for (const [offset, length] of [
        [MiB, 512],
        [MiB - 1, 2],
        [0xfffffffffffffe00n, 512],
        [0, 0xffffffff],
      ] as const) {
        const messages = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset, length });
        const decoded = decodeRead(messages, Number(offset), length);
        expect(decoded.problems).toEqual([]);
        expect([Errno.NBD_EINVAL, Errno.NBD_EOVERFLOW]).toContain(decoded.error);
        if (offset !== 0) expect(decoded.error).toBe(Errno.NBD_EINVAL);
      }
      const ok = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length: 4096 });
      expect(decodeRead(ok, 0, 4096).error).toBe(0);
    }
    await expectHealthy();
  });

  it('hostile: half a request header, or a WRITE with half its payload, then a disconnect: nothing reaches storage', async () => {
    const volume = catalog.volume('data');
    const before = volume.bytes(0, 65536);
    for (const cut of [1, 14, 27]) {
      const { peer } = await open('data');
      await peer.sendAndFlush(W.request({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length: 512 }).subarray(0, cut));
      peer.destroy();
    }
    for (const cut of [28, 28 + 1, 28 + 32768, 28 + 65535]) {
      const { peer } = await open('data', cut % 2 === 0);
      const bytes = W.request({ type: Cmd.NBD_CMD_WRITE, cookie: nextCookie(), offset: 0, payload: junk(65536, cut) });
      await peer.sendAndFlush(bytes.subarray(0, cut));
      peer.destroy();
    }
    await expectHandlesReleased();
    expect(volume.countCalls('write')).toBe(0);
    expect(volume.bytes(0, 65536).equals(before)).toBe(true);
    await expectHealthy();
  });

  it('hostile: a client that hangs up while its requests are in storage does no harm when they complete', async () => {
    const volume = catalog.volume('data');
    const readHold = volume.hold('read');
    const writeHold = volume.hold('write');
    const { peer } = await open('data', true);
    peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: nextCookie(), offset: 0, length: 65536 });
    peer.sendRequest({ type: Cmd.NBD_CMD_WRITE, cookie: nextCookie(), offset: 65536, payload: junk(4096, 11) });
    await Promise.all([readHold.reached, writeHold.reached]);
    peer.destroy();
    readHold.release();
    writeHold.release();
    await expectHandlesReleased();
    await expectHealthy();
  });

  it('hostile: requests after DISC are ignored and the connection still closes (server.close() then completes)', async () => {
    const { peer } = await open('data');
    const volume = catalog.volume('data');
    peer.send(
      Buffer.concat([
        W.request({ type: Cmd.NBD_CMD_DISC, cookie: nextCookie() }),
        W.request({ type: Cmd.NBD_CMD_WRITE, cookie: nextCookie(), offset: 0, payload: junk(512, 12) }),
        junk(300, 13),
      ]),
    );
    await peer.waitForClose();
    expect(volume.countCalls('write')).toBe(0);
    await expectHealthy();
    await expectHandlesReleased();
    serverClosed = true;
    await within(server.close(), 10_000, 'server.close() after a DISC followed by junk');
  });

  it('hostile: a client that stops reading replies while sending many reads: the server pauses, memory stays bounded, nothing is lost', async () => {
    const { peer } = await open('data');
    const volume = catalog.volume('data');
    volume.fill(0, junk(MiB, 14));
    const total = 2048;
    const length = 256 * 1024;
    const cookies = Array.from({ length: total }, () => nextCookie());
    peer.pauseReading();
    const baseline = process.memoryUsage().arrayBuffers;
    cookies.forEach((cookie, i) =>
      peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie, offset: (i % 4) * length, length }),
    );
    await within(volume.waitFor(() => volume.countCalls('read') >= 16), 10_000, 'the server starting to read');
    // The server stalls once its in-flight bound is reached; wait until the count of reads it
    // served stops moving (a quiet period is the only observable sign of "paused").
    let served = volume.countCalls('read');
    let peak = 0;
    for (let quiet = 0; quiet < 5 && served < total; ) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - baseline);
      const now = volume.countCalls('read');
      quiet = now === served ? quiet + 1 : 0;
      served = now;
    }
    expect(served, 'reads served while the client did not read').toBeLessThan(total);
    // 2048 × 256 KiB = 512 MiB of replies if nothing held the server back.
    expect(peak).toBeLessThan(200 * MiB);
    peer.resumeReading();
    const { byCookie } = await peer.collect(cookies, { timeoutMs: 30_000, keepPayload: false });
    expect(byCookie.size).toBe(total);
    for (const messages of byCookie.values()) expect(replyError(messages)).toBe(0);
    expect(volume.countCalls('read')).toBe(total);
    await expectHealthy();
  }, 60_000);

  it('hostile (fast-check): random bytes after GO never crash the server', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.uint8Array({ minLength: 1, maxLength: 64 }),
            fc
              .record({
                type: fc.integer({ min: 0, max: 12 }),
                flags: fc.integer({ min: 0, max: 0xffff }),
                offset: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
                length: fc.integer({ min: 0, max: 70_000 }),
              })
              .map((r) => {
                const header = W.request({ ...r, cookie: W.cookie(r.offset ^ 0x55n) });
                return r.type === Cmd.NBD_CMD_WRITE ? Buffer.concat([header, Buffer.alloc(r.length)]) : header;
              }),
          ),
          { maxLength: 8 },
        ),
        fc.boolean(),
        async (pieces, structured) => {
          const { peer } = await open('data', structured);
          try {
            for (const piece of pieces) await peer.sendAndFlush(piece);
            peer.end();
            await peer.waitForClose(10_000);
          } finally {
            peer.destroy();
          }
        },
      ),
      { numRuns: 30 },
    );
    await expectHealthy();
    await expectHandlesReleased();
  }, 60_000);
});
