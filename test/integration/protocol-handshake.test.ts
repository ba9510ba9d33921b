/**
 * Handshake obligations of the NBD spec (NBD-FACTS items 1–13, and 26's refusal), checked byte
 * by byte with a raw socket against an in-process NbdServer over an in-memory catalog. Expected
 * bytes come from test/helpers/wire.ts, never from src/nbd.
 */
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/server/index.js';
import { MemoryCatalog, MiB, protocolTestExports } from '../helpers/memory-catalog.js';
import { RawPeer, openTransmission, type OptionReply, type PeerTarget } from '../helpers/raw-peer.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Info, TxFlag, Cmd, ClientFlag, HandshakeFlag } = W;
const FIXED_AND_NO_ZEROES = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES;

let catalog: MemoryCatalog;
let server: NbdServer;
let target: PeerTarget;
const peers: RawPeer[] = [];

beforeEach(async () => {
  catalog = new MemoryCatalog(protocolTestExports());
  server = new NbdServer({ catalog, logger: pino({ level: 'silent' }) });
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  if (typeof address === 'string') throw new Error('expected a TCP address');
  target = { host: '127.0.0.1', port: address.port };
});

afterEach(async () => {
  for (const peer of peers.splice(0)) peer.destroy();
  catalog.releaseAll();
  await server.close();
});

async function connect(): Promise<RawPeer> {
  const peer = await RawPeer.connect(target);
  peers.push(peer);
  return peer;
}

/** A peer past the greeting, with fixed newstyle and no zeroes agreed. */
async function negotiating(flags: number = FIXED_AND_NO_ZEROES): Promise<RawPeer> {
  const peer = await connect();
  await peer.startHandshake(flags);
  return peer;
}

function types(replies: readonly OptionReply[]): number[] {
  return replies.map((r) => r.type);
}

function final(replies: readonly OptionReply[]): OptionReply {
  const last = replies[replies.length - 1];
  if (last === undefined) throw new Error('no replies');
  return last;
}

async function expectListWorks(peer: RawPeer): Promise<void> {
  const replies = await peer.option(Opt.NBD_OPT_LIST);
  expect(final(replies).type).toBe(Rep.NBD_REP_ACK);
  expect(replies.filter((r) => r.type === Rep.NBD_REP_SERVER).length).toBe(catalog.list().length);
}

/** Sends a READ on a fresh transmission and checks that the very next bytes are its reply. */
async function expectImmediateSimpleReply(peer: RawPeer): Promise<void> {
  const cookie = W.cookie(0x1122334455667788n);
  const replies = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie, offset: 0, length: 512 });
  expect(replies).toHaveLength(1);
  const reply = replies[0];
  expect(reply?.kind).toBe('simple');
  expect(reply?.cookie.equals(cookie)).toBe(true);
  expect(reply?.kind === 'simple' ? reply.data?.length : -1).toBe(512);
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

describe('handshake (facts 1–13)', () => {
  it('fact 1: the greeting is NBDMAGIC, IHAVEOPT, then handshake flags with FIXED_NEWSTYLE and no bit but NO_ZEROES besides', async () => {
    const peer = await connect();
    const raw = await peer.readExactly(W.GREETING_LENGTH);
    expect(raw.subarray(0, 8).toString('latin1')).toBe('NBDMAGIC');
    expect(raw.subarray(8, 16).toString('latin1')).toBe('IHAVEOPT');
    const greeting = W.parseGreeting(raw);
    expect(greeting.nbdMagic).toBe(W.NBDMAGIC);
    expect(greeting.ihaveopt).toBe(W.IHAVEOPT);
    expect(greeting.handshakeFlags & HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE).toBe(HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE);
    expect(greeting.handshakeFlags & ~(HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | HandshakeFlag.NBD_FLAG_NO_ZEROES)).toBe(0);
  });

  it('fact 2: client flags with an unknown bit make the server close the connection without answering options', async () => {
    for (const badFlags of [ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | (1 << 2), 0x80000000 | 1, 0xffffffff]) {
      const peer = await connect();
      await peer.startHandshake(badFlags);
      peer.sendOption(Opt.NBD_OPT_LIST);
      const leftover = await peer.waitForClose();
      expect(leftover.length, `flags 0x${badFlags.toString(16)}`).toBe(0);
    }
  });

  it('fact 2: C_NO_ZEROES is accepted because NO_ZEROES was offered (and refused when it was not)', async () => {
    const probe = await connect();
    const greeting = await probe.readGreeting();
    probe.send(W.clientFlags(FIXED_AND_NO_ZEROES));
    if ((greeting.handshakeFlags & HandshakeFlag.NBD_FLAG_NO_ZEROES) !== 0) {
      await expectListWorks(probe);
    } else {
      probe.sendOption(Opt.NBD_OPT_LIST);
      expect((await probe.waitForClose()).length).toBe(0);
    }
  });

  it('fact 3: every option but EXPORT_NAME gets replies with the reply magic, the option echoed, a type and a length', async () => {
    const peer = await negotiating();
    const sent: Array<[number, Uint8Array]> = [
      [Opt.NBD_OPT_LIST, Buffer.alloc(0)],
      [Opt.NBD_OPT_STARTTLS, Buffer.alloc(0)],
      [Opt.NBD_OPT_INFO, W.goData('data', [Info.NBD_INFO_BLOCK_SIZE])],
      [0x00abcdef, Buffer.from('unknown option data')],
      [Opt.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
      [Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', ['base:'])],
      [Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation'])],
      [Opt.NBD_OPT_EXTENDED_HEADERS, Buffer.alloc(0)],
      [Opt.NBD_OPT_INFO, W.goData('no-such-export')],
      [Opt.NBD_OPT_ABORT, Buffer.alloc(0)],
    ];
    for (const [opt, data] of sent) {
      peer.sendOption(opt, data);
      const replies = await peer.readOptionReplies();
      for (const reply of replies) {
        expect(reply.magic).toBe(W.NBD_OPTION_REPLY_MAGIC);
        expect(reply.option, `option ${opt}`).toBe(opt);
      }
    }
  });

  it('fact 4: an unknown option gets ERR_UNSUP and the next option is still parsed (its data skipped by length)', async () => {
    const peer = await negotiating();
    // Data that looks like another option, to catch a server that does not skip by length.
    const decoy = Buffer.concat([W.option(Opt.NBD_OPT_ABORT), Buffer.alloc(1000, 0xa5)]);
    for (const opt of [0x00abcdef, Opt.NBD_OPT_PEEK_EXPORT, 0x7fffffff, 0xffffffff, 0]) {
      const replies = await peer.option(opt, decoy);
      expect(replies, `option 0x${opt.toString(16)}`).toHaveLength(1);
      expect(final(replies).type).toBe(Rep.NBD_REP_ERR_UNSUP);
      expect(final(replies).option).toBe(opt);
    }
    // The same unknown option split across many TCP writes.
    const bytes = W.option(0x1234, Buffer.alloc(4000, 7));
    for (let at = 0; at < bytes.length; at += 333) await peer.sendAndFlush(bytes.subarray(at, at + 333));
    expect(types(await peer.readOptionReplies())).toEqual([Rep.NBD_REP_ERR_UNSUP]);
    await expectListWorks(peer);
  });

  it('fact 5: EXPORT_NAME success sends size, flags and no zeros once C_NO_ZEROES was agreed', async () => {
    const peer = await negotiating(FIXED_AND_NO_ZEROES);
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('data'));
    const reply = W.parseExportNameReply(await peer.readExactly(10));
    expect(reply.size).toBe(BigInt(MiB));
    expect(reply.transmissionFlags & TxFlag.NBD_FLAG_HAS_FLAGS).toBe(TxFlag.NBD_FLAG_HAS_FLAGS);
    await expectImmediateSimpleReply(peer);
  });

  it('fact 5: EXPORT_NAME success sends size, flags and 124 zero bytes without C_NO_ZEROES', async () => {
    const peer = await negotiating(ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE);
    await expectListWorks(peer);
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('ro'));
    const reply = W.parseExportNameReply(await peer.readExactly(10));
    expect(reply.size).toBe(BigInt(MiB));
    expect(reply.transmissionFlags & TxFlag.NBD_FLAG_READ_ONLY).toBe(TxFlag.NBD_FLAG_READ_ONLY);
    expect((await peer.readExactly(124)).equals(Buffer.alloc(124))).toBe(true);
    await expectImmediateSimpleReply(peer);
  });

  it('fact 5: EXPORT_NAME for an unknown export ends the session with no reply', async () => {
    const peer = await negotiating();
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.from('no-such-export'));
    expect((await peer.waitForClose()).length).toBe(0);
  });

  it('fact 6: GO sends NBD_INFO_EXPORT (length 12) before ACK, with no padding after the ACK', async () => {
    const peer = await negotiating();
    const result = await peer.go('data');
    expect(final(result.replies).type).toBe(Rep.NBD_REP_ACK);
    const infoReplies = result.replies.filter((r) => r.type === Rep.NBD_REP_INFO);
    const exportReplies = infoReplies.filter((r) => r.data.readUInt16BE(0) === Info.NBD_INFO_EXPORT);
    expect(exportReplies).toHaveLength(1);
    expect(exportReplies[0]?.data.length).toBe(12);
    expect(result.replies.indexOf(exportReplies[0] as OptionReply)).toBeLessThan(result.replies.length - 1);
    expect(final(result.replies).data.length).toBe(0);
    expect(result.export?.size).toBe(MiB);
    for (const reply of result.replies) expect(reply.option).toBe(Opt.NBD_OPT_GO);
    await expectImmediateSimpleReply(peer);
  });

  it('fact 6: info requests the server does not know are ignored', async () => {
    const peer = await negotiating();
    const result = await peer.go('data', [0x4242, Info.NBD_INFO_NAME, 0xffff, Info.NBD_INFO_DESCRIPTION], Opt.NBD_OPT_INFO);
    expect(final(result.replies).type).toBe(Rep.NBD_REP_ACK);
    expect(result.infos.some((i) => i.type === Info.NBD_INFO_EXPORT)).toBe(true);
    expect(result.infos.some((i) => i.type === 0x4242 || i.type === 0xffff)).toBe(false);
    // INFO did not enter transmission: options still work.
    await expectListWorks(peer);
  });

  it('fact 6: INFO followed by GO with the same arguments gets the same information', async () => {
    const peer = await negotiating();
    const infos = [Info.NBD_INFO_NAME, Info.NBD_INFO_DESCRIPTION, Info.NBD_INFO_BLOCK_SIZE];
    const info = await peer.go('data', infos, Opt.NBD_OPT_INFO);
    const go = await peer.go('data', infos, Opt.NBD_OPT_GO);
    const payloads = (replies: readonly OptionReply[]): string[] =>
      replies.filter((r) => r.type === Rep.NBD_REP_INFO).map((r) => r.data.toString('hex')).sort();
    expect(final(info.replies).type).toBe(Rep.NBD_REP_ACK);
    expect(final(go.replies).type).toBe(Rep.NBD_REP_ACK);
    expect(payloads(go.replies)).toEqual(payloads(info.replies));
  });

  it('fact 6: a name length greater than option length − 6 gets ERR_INVALID and negotiation goes on', async () => {
    const peer = await negotiating();
    for (const opt of [Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO]) {
      // Claims a 100-byte name in 4 + 4 + 2 bytes of data.
      const data = Buffer.concat([W.u32(100), Buffer.from('data'), W.u16(0)]);
      expect(types(await peer.option(opt, data))).toEqual([Rep.NBD_REP_ERR_INVALID]);
      // Name fits but the info count promises more requests than the data holds.
      const short = Buffer.concat([W.u32(4), Buffer.from('data'), W.u16(3), W.u16(Info.NBD_INFO_NAME)]);
      expect(final(await peer.option(opt, short)).type).toBe(Rep.NBD_REP_ERR_INVALID);
      // Too short to hold even the name length and the count.
      expect(final(await peer.option(opt, Buffer.from([0, 0]))).type).toBe(Rep.NBD_REP_ERR_INVALID);
    }
    expect((await peer.go('data')).export?.size).toBe(MiB);
  });

  it('fact 6: GO or INFO for an export that does not exist gets ERR_UNKNOWN without INFO replies', async () => {
    const peer = await negotiating();
    for (const opt of [Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO]) {
      const result = await peer.go('no-such-export', [Info.NBD_INFO_BLOCK_SIZE], opt);
      expect(types(result.replies)).toEqual([Rep.NBD_REP_ERR_UNKNOWN]);
    }
    expect((await peer.go('data')).export?.size).toBe(MiB);
  });

  it('fact 7: INFO_BLOCK_SIZE is sent when asked, with legal sizes (min 1 or 512, preferred 4096, max 32 MiB), never BLOCK_SIZE_REQD', async () => {
    const peer = await negotiating();
    for (const opt of [Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO]) {
      const result = await peer.go('odd', [Info.NBD_INFO_BLOCK_SIZE], opt);
      expect(types(result.replies)).not.toContain(Rep.NBD_REP_ERR_BLOCK_SIZE_REQD);
      expect(final(result.replies).type).toBe(Rep.NBD_REP_ACK);
      const raw = result.replies.filter(
        (r) => r.type === Rep.NBD_REP_INFO && r.data.readUInt16BE(0) === Info.NBD_INFO_BLOCK_SIZE,
      );
      expect(raw).toHaveLength(1);
      expect(raw[0]?.data.length).toBe(14);
      const sizes = W.parseInfo(raw[0]?.data ?? Buffer.alloc(0));
      if (!('minimum' in sizes)) throw new Error('malformed NBD_INFO_BLOCK_SIZE');
      expect(isPowerOfTwo(sizes.minimum)).toBe(true);
      expect(sizes.minimum).toBeLessThanOrEqual(64 * 1024);
      expect(isPowerOfTwo(sizes.preferred)).toBe(true);
      expect(sizes.preferred).toBeGreaterThanOrEqual(Math.max(sizes.minimum, 512));
      expect(sizes.maximum).toBeGreaterThanOrEqual(sizes.preferred);
      // What issue 2 asks of clonebd in particular.
      expect([1, 512]).toContain(sizes.minimum);
      expect(sizes.preferred).toBe(4096);
      expect(sizes.maximum).toBe(W.MAX_DEFAULT_PAYLOAD);
    }
  });

  it('fact 7: GO without a block-size request is not refused with BLOCK_SIZE_REQD (default constraints)', async () => {
    const peer = await negotiating();
    const result = await peer.go('data', []);
    expect(final(result.replies).type).toBe(Rep.NBD_REP_ACK);
  });

  it('fact 8: ABORT is answered with ACK, then the server ends the session', async () => {
    for (const data of [Buffer.alloc(0), Buffer.from('ignored data')]) {
      const peer = await negotiating();
      peer.sendOption(Opt.NBD_OPT_ABORT, data);
      const rest = await peer.waitForClose();
      expect(rest.length).toBe(W.OPTION_REPLY_HEADER_LENGTH);
      const header = W.parseOptionReplyHeader(rest);
      expect(header.magic).toBe(W.NBD_OPTION_REPLY_MAGIC);
      expect(header.option).toBe(Opt.NBD_OPT_ABORT);
      expect(header.type).toBe(Rep.NBD_REP_ACK);
      expect(header.length).toBe(0);
    }
  });

  it('fact 8: a client that sends ABORT and hangs up at once does not disturb the server', async () => {
    for (let i = 0; i < 5; i++) {
      const peer = await negotiating();
      peer.sendOption(Opt.NBD_OPT_ABORT);
      peer.destroy();
    }
    const peer = await negotiating();
    await expectListWorks(peer);
  });

  it('fact 9: LIST sends one REP_SERVER per export, then ACK; LIST with data gets ERR_INVALID', async () => {
    const peer = await negotiating();
    const replies = await peer.option(Opt.NBD_OPT_LIST);
    expect(final(replies).type).toBe(Rep.NBD_REP_ACK);
    const servers = replies.slice(0, -1);
    for (const reply of servers) expect(reply.type).toBe(Rep.NBD_REP_SERVER);
    const names = servers.map((r) => W.parseRepServer(r.data).name.toString('utf8')).sort();
    expect(names).toEqual(catalog.list().map((e) => e.name).sort());

    expect(types(await peer.option(Opt.NBD_OPT_LIST, Buffer.from('x')))).toEqual([Rep.NBD_REP_ERR_INVALID]);
    await expectListWorks(peer);
  });

  it('fact 10 (NOTLS): STARTTLS gets ERR_UNSUP or ERR_POLICY, and no option ever gets ERR_TLS_REQD', async () => {
    const peer = await negotiating();
    const seen: number[] = [];
    for (const data of [Buffer.alloc(0), Buffer.from('data')]) {
      const replies = await peer.option(Opt.NBD_OPT_STARTTLS, data);
      expect(replies).toHaveLength(1);
      expect(W.isErrorReplyType(final(replies).type)).toBe(true);
      if (data.length === 0) expect([Rep.NBD_REP_ERR_UNSUP, Rep.NBD_REP_ERR_POLICY]).toContain(final(replies).type);
      seen.push(...types(replies));
    }
    seen.push(...types(await peer.option(Opt.NBD_OPT_LIST)));
    seen.push(...types((await peer.go('no-such-export', [], Opt.NBD_OPT_INFO)).replies));
    seen.push(...types(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY)));
    const go = await peer.go('data');
    seen.push(...types(go.replies));
    expect(seen).not.toContain(Rep.NBD_REP_ERR_TLS_REQD);
    expect(go.export?.size).toBe(MiB);
  });

  it('fact 11: STRUCTURED_REPLY answered with ACK means READ uses structured replies from then on', async () => {
    const peer = await negotiating();
    expect(types(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')))).toEqual([Rep.NBD_REP_ERR_INVALID]);
    expect(types(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY))).toEqual([Rep.NBD_REP_ACK]);
    peer.structured = true;
    expect((await peer.go('data')).export?.size).toBe(MiB);
    const cookie = W.cookie(7);
    const replies = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie, offset: 0, length: 4096 });
    expect(replies.length).toBeGreaterThan(0);
    for (const reply of replies) {
      expect(reply.kind).toBe('chunk');
      expect(reply.magic).toBe(W.NBD_STRUCTURED_REPLY_MAGIC);
    }
  });

  it('fact 11: without STRUCTURED_REPLY, READ gets a simple reply', async () => {
    const { peer } = await openTransmission(target, { exportName: 'data' });
    peers.push(peer);
    await expectImmediateSimpleReply(peer);
  });

  describe('fact 12: meta contexts', () => {
    async function structuredPeer(): Promise<RawPeer> {
      const peer = await negotiating();
      expect(types(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY))).toEqual([Rep.NBD_REP_ACK]);
      peer.structured = true;
      return peer;
    }

    function contextNames(replies: readonly OptionReply[]): string[] {
      return replies
        .filter((r) => r.type === Rep.NBD_REP_META_CONTEXT)
        .map((r) => W.parseMetaContext(r.data).name.toString('utf8'));
    }

    it('fact 12: LIST treats base: as a wildcard and lists base:allocation; zero queries list what is available', async () => {
      const peer = await structuredPeer();
      const wildcard = await peer.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', ['base:']));
      expect(final(wildcard).type).toBe(Rep.NBD_REP_ACK);
      expect(contextNames(wildcard)).toContain('base:allocation');

      const exact = await peer.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', ['base:allocation']));
      expect(contextNames(exact)).toEqual(['base:allocation']);
      expect(final(exact).type).toBe(Rep.NBD_REP_ACK);

      const all = await peer.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', []));
      expect(final(all).type).toBe(Rep.NBD_REP_ACK);
      expect(contextNames(all).some((name) => name === 'base:allocation' || name === 'base:')).toBe(true);
    });

    it('fact 12: unknown namespaces and unknown base: leaves are ignored, not errors', async () => {
      const peer = await structuredPeer();
      for (const opt of [Opt.NBD_OPT_LIST_META_CONTEXT, Opt.NBD_OPT_SET_META_CONTEXT]) {
        const replies = await peer.option(opt, W.metaContextData('data', ['x-clonebd-test:thing', 'base:no-such-leaf', 'qemu:dirty-bitmap:x']));
        expect(types(replies)).toEqual([Rep.NBD_REP_ACK]);
      }
      const mixed = await peer.option(
        Opt.NBD_OPT_SET_META_CONTEXT,
        W.metaContextData('data', ['x-clonebd-test:thing', 'base:allocation', 'base:no-such-leaf']),
      );
      expect(contextNames(mixed)).toEqual(['base:allocation']);
      expect(final(mixed).type).toBe(Rep.NBD_REP_ACK);
    });

    it('fact 12: SET replies with one REP_META_CONTEXT per selected context (unique IDs), then ACK; BLOCK_STATUS uses that ID', async () => {
      const peer = await structuredPeer();
      const replies = await peer.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation']));
      expect(types(replies)).toEqual([Rep.NBD_REP_META_CONTEXT, Rep.NBD_REP_ACK]);
      const contexts = replies.slice(0, -1).map((r) => W.parseMetaContext(r.data));
      expect(new Set(contexts.map((c) => c.id)).size).toBe(contexts.length);
      const id = contexts[0]?.id;
      expect((await peer.go('data')).export?.size).toBe(MiB);
      const cookie = W.cookie(99);
      const reply = await peer.roundTrip({ type: Cmd.NBD_CMD_BLOCK_STATUS, cookie, offset: 0, length: 65536 });
      const statusChunks = reply.filter((m) => m.kind === 'chunk' && m.type === W.ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS);
      expect(statusChunks).toHaveLength(1);
      const chunk = statusChunks[0];
      expect(chunk?.kind === 'chunk' ? W.parseBlockStatus(chunk.payload).contextId : undefined).toBe(id);
    });

    it('fact 12: SET with zero queries selects nothing (and BLOCK_STATUS then gets EINVAL)', async () => {
      const peer = await structuredPeer();
      expect(types(await peer.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation'])))).toEqual([
        Rep.NBD_REP_META_CONTEXT,
        Rep.NBD_REP_ACK,
      ]);
      // A later SET replaces the earlier selection.
      expect(types(await peer.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', []))) ).toEqual([Rep.NBD_REP_ACK]);
      expect((await peer.go('data')).export?.size).toBe(MiB);
      const cookie = W.cookie(5);
      const reply = await peer.roundTrip({ type: Cmd.NBD_CMD_BLOCK_STATUS, cookie, offset: 0, length: 4096 });
      const error = reply.find((m) => (m.kind === 'simple' ? m.error !== 0 : W.isErrorChunkType(m.type)));
      expect(error, 'BLOCK_STATUS without a selected context must fail').toBeDefined();
      if (error?.kind === 'simple') expect(error.error).toBe(W.Errno.NBD_EINVAL);
      else if (error?.kind === 'chunk') expect(W.parseErrorChunk(error.type, error.payload).error).toBe(W.Errno.NBD_EINVAL);
    });

    it('fact 12: a malformed query gets ERR_INVALID, and negotiation goes on', async () => {
      const peer = await structuredPeer();
      const malformed: Buffer[] = [
        // A query length that runs past the option data.
        Buffer.concat([W.u32(4), Buffer.from('data'), W.u32(1), W.u32(200), Buffer.from('base:allocation')]),
        // Two queries promised, one present.
        Buffer.concat([W.u32(4), Buffer.from('data'), W.u32(2), W.u32(15), Buffer.from('base:allocation')]),
        // An export name length beyond the data.
        Buffer.concat([W.u32(400), Buffer.from('data'), W.u32(0)]),
        // Truncated before the query count.
        Buffer.concat([W.u32(4), Buffer.from('data')]),
      ];
      for (const opt of [Opt.NBD_OPT_LIST_META_CONTEXT, Opt.NBD_OPT_SET_META_CONTEXT]) {
        for (const data of malformed) {
          const replies = await peer.option(opt, data);
          expect(final(replies).type, `${opt}: ${data.toString('hex')}`).toBe(Rep.NBD_REP_ERR_INVALID);
        }
      }
      await expectListWorks(peer);
    });

    it('fact 12: SET_META_CONTEXT before STRUCTURED_REPLY gets ERR_INVALID', async () => {
      const peer = await negotiating();
      const replies = await peer.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation']));
      expect(types(replies)).toEqual([Rep.NBD_REP_ERR_INVALID]);
      await expectListWorks(peer);
    });
  });

  it('fact 13: every string the server sends is UTF-8 without NUL and at most 4096 bytes', async () => {
    const peer = await negotiating();
    const strings: Buffer[] = [];
    const errorReplies: OptionReply[] = [];
    const collect = (replies: readonly OptionReply[]): void => {
      for (const reply of replies) {
        if (reply.type === Rep.NBD_REP_SERVER) {
          const server = W.parseRepServer(reply.data);
          strings.push(server.name, server.details);
        } else if (reply.type === Rep.NBD_REP_INFO) {
          const info = W.parseInfo(reply.data);
          if ('name' in info) strings.push(info.name);
          if ('description' in info) strings.push(info.description);
        } else if (reply.type === Rep.NBD_REP_META_CONTEXT) {
          strings.push(W.parseMetaContext(reply.data).name);
        } else if (W.isErrorReplyType(reply.type)) {
          errorReplies.push(reply);
          strings.push(reply.data);
        }
      }
    };
    collect(await peer.option(Opt.NBD_OPT_LIST));
    for (const exp of catalog.list()) {
      collect((await peer.go(exp.name, [Info.NBD_INFO_NAME, Info.NBD_INFO_DESCRIPTION], Opt.NBD_OPT_INFO)).replies);
    }
    collect((await peer.go('no-such-export', [], Opt.NBD_OPT_INFO)).replies);
    collect(await peer.option(0x00abcdef));
    collect(await peer.option(Opt.NBD_OPT_LIST, Buffer.from('x')));
    collect(await peer.option(Opt.NBD_OPT_SET_META_CONTEXT, W.metaContextData('data', ['base:allocation'])));
    collect(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY));
    collect(await peer.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData('data', ['base:'])));
    expect(errorReplies.length).toBeGreaterThan(0);
    for (const text of strings) expect(W.isValidNbdString(text), text.toString('hex')).toBe(true);
  });

  it('fact 13: a UTF-8 export name round-trips byte for byte through LIST and GO', async () => {
    const name = 'dönnées-ünïcode';
    const peer = await negotiating();
    const listed = (await peer.option(Opt.NBD_OPT_LIST))
      .filter((r) => r.type === Rep.NBD_REP_SERVER)
      .map((r) => W.parseRepServer(r.data).name);
    expect(listed.some((n) => n.equals(Buffer.from(name, 'utf8')))).toBe(true);
    const info = await peer.go(name, [Info.NBD_INFO_DESCRIPTION], Opt.NBD_OPT_INFO);
    const description = info.infos.find((i) => 'description' in i);
    if (description !== undefined && 'description' in description) {
      expect(description.description.toString('utf8')).toBe('ein Export mit UTF-8-Namen ✓');
    }
    expect((await peer.go(Buffer.from(name, 'utf8'))).export?.size).toBe(64 * 1024);
  });

  it('fact 13: export names longer than 4096 bytes, with NUL, or not UTF-8 are refused with an error reply and negotiation goes on', async () => {
    const peer = await negotiating();
    const bad = [Buffer.alloc(5000, 0x61), Buffer.from('da\u0000ta', 'utf8'), Buffer.from([0x64, 0xff, 0xfe, 0x61])];
    for (const name of bad) {
      for (const opt of [Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO]) {
        const result = await peer.go(name, [], opt);
        expect(W.isErrorReplyType(final(result.replies).type)).toBe(true);
        expect(final(result.replies).type).not.toBe(Rep.NBD_REP_ERR_TLS_REQD);
      }
      const meta = await peer.option(Opt.NBD_OPT_LIST_META_CONTEXT, W.metaContextData(name, ['base:']));
      expect(final(meta).type).not.toBe(Rep.NBD_REP_ERR_TLS_REQD);
    }
    await expectListWorks(peer);
  });

  it('fact 26: NBD_OPT_EXTENDED_HEADERS gets ERR_UNSUP (extended headers are not implemented)', async () => {
    const peer = await negotiating();
    expect(types(await peer.option(Opt.NBD_OPT_STRUCTURED_REPLY))).toEqual([Rep.NBD_REP_ACK]);
    expect(types(await peer.option(Opt.NBD_OPT_EXTENDED_HEADERS))).toEqual([Rep.NBD_REP_ERR_UNSUP]);
    peer.structured = true;
    // Still normal structured replies afterwards.
    expect((await peer.go('data')).export?.size).toBe(MiB);
    const replies = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: W.cookie(1), offset: 0, length: 512 });
    for (const reply of replies) expect(reply.magic).toBe(W.NBD_STRUCTURED_REPLY_MAGIC);
  });
});
