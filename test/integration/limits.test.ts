/**
 * The limits a hostile or broken client runs into, set from `clonebd serve`'s command line:
 * handshake deadline (plain and TLS), option size, request size, connections in total and per
 * address, idle timeout; and requests in flight per connection on an in-process server.
 */
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/server/index.js';
import { MemoryCatalog, MiB, protocolTestExports } from '../helpers/memory-catalog.js';
import { PeerClosedError, RawPeer, openTransmission, replyError, type PeerTarget } from '../helpers/raw-peer.js';
import { CLI_PATH, startServerProcess, stopAllServerProcesses, type LogLine, type ServerProcess } from '../helpers/server-process.js';
import { makeTlsFixture, type TlsFixture } from '../helpers/tls-certs.js';
import { describeResult, makeTempDir, removeTempDirs, run } from '../helpers/tools.js';
import * as W from '../helpers/wire.js';

const { Opt, Rep, Cmd, Info } = W;
const KiB = 1024;
const VOLUME = 'vol';

const peers: RawPeer[] = [];
let fixture: TlsFixture;
let work: string;

beforeAll(async () => {
  work = await makeTempDir('clonebd-limits-');
  fixture = await makeTlsFixture(join(work, 'pki'));
});

afterEach(() => {
  for (const peer of peers.splice(0)) peer.destroy();
});

afterAll(async () => {
  await stopAllServerProcesses();
  await removeTempDirs();
});

function serve(args: string[]): Promise<ServerProcess> {
  return startServerProcess({ args, prepare: (pool) => pool.createVolume(VOLUME, MiB) });
}

function targetOf(server: ServerProcess): PeerTarget {
  return { host: '127.0.0.1', port: server.port };
}

async function connect(target: PeerTarget, localAddress?: string): Promise<RawPeer> {
  const peer = await RawPeer.connect(target, undefined, localAddress === undefined ? {} : { localAddress });
  peers.push(peer);
  return peer;
}

async function transmission(target: PeerTarget, infos: number[] = []): Promise<Awaited<ReturnType<typeof openTransmission>>> {
  const opened = await openTransmission(target, { exportName: VOLUME, infos });
  peers.push(opened.peer);
  return opened;
}

/** Waits until the server has logged `count` lines with this message. */
function logged(server: ServerProcess, msg: string, count: number): Promise<LogLine> {
  let seen = 0;
  return server.waitForLog((line) => line.msg === msg && ++seen >= count, 15_000);
}

function countLogs(server: ServerProcess, msg: string): number {
  return server.logs.filter((line) => line.msg === msg).length;
}

async function readWorks(peer: RawPeer, cookie: number): Promise<void> {
  const reply = await peer.roundTrip({ type: Cmd.NBD_CMD_READ, cookie: W.cookie(cookie), offset: 0, length: 4096 });
  expect(replyError(reply)).toBe(0);
}

describe('handshake deadline, option and request sizes', () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await serve([
      '--handshake-timeout', '2',
      '--max-option-size', '8KiB',
      '--max-request-size', '64KiB',
      '--tls', 'optional', '--tls-cert', fixture.server.cert, '--tls-key', fixture.server.key,
    ]);
  });

  it('clients that stall after the greeting, inside an option, or inside the TLS handshake are dropped; one that reached transmission stays', async () => {
    const target = targetOf(server);
    const { peer: served } = await transmission(target);
    const before = countLogs(server, 'handshake not finished in time; dropping the connection');

    const silent = await connect(target);
    await silent.readGreeting();
    const halfOption = await connect(target);
    await halfOption.startHandshake();
    halfOption.send(W.option(Opt.NBD_OPT_GO, W.goData(VOLUME)).subarray(0, 20));
    const tlsStall = await connect(target);
    await tlsStall.startHandshake();
    expect((await tlsStall.option(Opt.NBD_OPT_STARTTLS)).map((r) => r.type)).toEqual([Rep.NBD_REP_ACK]);

    for (const peer of [silent, halfOption, tlsStall]) await peer.waitForClose(15_000);
    await logged(server, 'handshake not finished in time; dropping the connection', before + 3);
    // The deadline has passed for the served connection too, which idles (no idle timeout by default) and stays.
    await readWorks(served, 1);
  });

  it('an option over --max-option-size gets ERR_TOO_BIG, one at the limit is read, and the connection carries on', async () => {
    const peer = await connect(targetOf(server));
    await peer.startHandshake();
    const over = await peer.option(Opt.NBD_OPT_LIST, Buffer.alloc(8 * KiB + 1));
    expect(over.map((r) => r.type)).toEqual([Rep.NBD_REP_ERR_TOO_BIG]);
    const atLimit = await peer.option(0x4242, Buffer.alloc(8 * KiB));
    expect(atLimit.map((r) => r.type)).toEqual([Rep.NBD_REP_ERR_UNSUP]);
    expect((await peer.go(VOLUME)).export?.size).toBe(MiB);
  });

  it('an EXPORT_NAME over --max-option-size closes the connection', async () => {
    const peer = await connect(targetOf(server));
    await peer.startHandshake();
    peer.sendOption(Opt.NBD_OPT_EXPORT_NAME, Buffer.alloc(8 * KiB + 1, 0x61));
    expect((await peer.waitForClose()).length).toBe(0);
  });

  it('--max-request-size is advertised as the maximum block size; a WRITE over it gets EINVAL, one at it succeeds', async () => {
    const { peer, infos } = await transmission(targetOf(server), [Info.NBD_INFO_BLOCK_SIZE]);
    const sizes = infos.find((info) => info.type === Info.NBD_INFO_BLOCK_SIZE);
    expect(sizes).toMatchObject({ maximum: 64 * KiB });
    const over = await peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, cookie: W.cookie(1), offset: 0, payload: Buffer.alloc(64 * KiB + 4 * KiB, 1) });
    expect(replyError(over)).toBe(W.Errno.NBD_EINVAL);
    const at = await peer.roundTrip({ type: Cmd.NBD_CMD_WRITE, cookie: W.cookie(2), offset: 0, payload: Buffer.alloc(64 * KiB, 2) });
    expect(replyError(at)).toBe(0);
  });
});

describe('connection limits', () => {
  it('--max-connections-per-address and --max-connections close surplus connections before the greeting; a closed one frees its slot', async () => {
    const server = await serve(['--max-connections', '4', '--max-connections-per-address', '2']);
    const target = targetOf(server);
    const refused = async (localAddress: string): Promise<void> => {
      const peer = await connect(target, localAddress);
      await expect(peer.readGreeting()).rejects.toBeInstanceOf(PeerClosedError);
    };
    const first = await connect(target, '127.0.0.1');
    await first.readGreeting();
    await (await connect(target, '127.0.0.1')).readGreeting();
    await refused('127.0.0.1');
    await (await connect(target, '127.0.0.2')).readGreeting();
    await (await connect(target, '127.0.0.2')).readGreeting();
    // Four open: a third address is within its own limit but over the total.
    await refused('127.0.0.3');
    await logged(server, 'connection refused', 2);
    expect(server.logs.filter((line) => line.msg === 'connection refused').map((line) => line.reason)).toEqual([
      '127.0.0.1 has 2 connections, the limit per address',
      'the server has 4 connections, its limit',
    ]);

    const closedBefore = countLogs(server, 'connection closed');
    first.destroy();
    await logged(server, 'connection closed', closedBefore + 1);
    await (await connect(target, '127.0.0.1')).readGreeting();
  });
});

describe('idle timeout', () => {
  it('with --idle-timeout, a connection in transmission with nothing in flight and no traffic is closed', async () => {
    const server = await serve(['--idle-timeout', '0.5']);
    const { peer } = await transmission(targetOf(server));
    await peer.waitForClose(15_000);
    await logged(server, 'connection idle; closing it', 1);
  });
});

describe('requests in flight per connection', () => {
  let server: NbdServer | undefined;
  let catalog: MemoryCatalog | undefined;
  afterEach(async () => {
    catalog?.releaseAll();
    await server?.close();
  });

  it('past maxInFlightRequests the server reads no further request until one is answered', async () => {
    catalog = new MemoryCatalog(protocolTestExports());
    server = new NbdServer({ catalog, logger: pino({ level: 'silent' }), limits: { maxInFlightRequests: 2 } });
    const address = await server.listen({ host: '127.0.0.1', port: 0 });
    if (typeof address === 'string') throw new Error('expected a TCP address');
    const opened = await openTransmission({ host: '127.0.0.1', port: address.port }, { exportName: 'data' });
    peers.push(opened.peer);
    const volume = catalog.volume('data');
    const holds = [volume.hold('read', (c) => c.offset === 0), volume.hold('read', (c) => c.offset === 4096)];
    const cookies = [0, 4096, 8192].map((offset) => W.cookie(offset + 1));
    // Corked into one write, so all three requests reach the server together.
    opened.peer.socket.cork();
    [0, 4096, 8192].forEach((offset, i) => opened.peer.sendRequest({ type: Cmd.NBD_CMD_READ, cookie: cookies[i]!, offset, length: 4096 }));
    opened.peer.socket.uncork();
    await Promise.all(holds.map((hold) => hold.reached));
    expect(volume.calls.filter((call) => call.op === 'read').map((call) => call.offset)).toEqual([0, 4096]);
    holds[0]!.release();
    holds[1]!.release();
    const { byCookie } = await opened.peer.collect(cookies);
    expect(byCookie.size).toBe(3);
    expect(volume.calls.filter((call) => call.op === 'read').map((call) => call.offset)).toEqual([0, 4096, 8192]);
  });
});

describe('limit options on the command line', () => {
  it('values out of range are refused at start, naming the option', async () => {
    const pool = join(work, 'never-served');
    const cases = [
      ['--max-connections', '0'],
      ['--max-requests-in-flight', '1.5'],
      ['--max-option-size', '1KiB'],
      ['--max-request-size', '1GiB'],
      ['--handshake-timeout', '-1'],
      ['--idle-timeout', 'soon'],
      ['--busy-poll', '-1'],
      ['--busy-poll', '2000000'],
    ] as const;
    const results = await Promise.all(
      cases.map(([option, value]) => run(process.execPath, [CLI_PATH, 'serve', '--pool', pool, '--listen', '127.0.0.1:0', option, value])),
    );
    results.forEach((result, i) => {
      expect(result.code, describeResult(result)).not.toBe(0);
      expect(result.stderr, describeResult(result)).toContain(cases[i]![0]);
    });
  });
});
